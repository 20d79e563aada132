//! Task events to containerd over its ttrpc socket (`TTRPC_ADDRESS`).
//!
//! containerd-shim's RemotePublisher holds a sync ttrpc client, which wakes the shim 100 times
//! a second for its whole life (see protocol::blocking); this one uses the async client on
//! the same runtime as the agent's connection. It connects on first use and again after a
//! failed send, so events also reach a containerd that restarted meanwhile.

use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use protocol::ttrpc::context;

use crate::error::{Result, ShimError};

/// How long containerd may take to take an event.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Publisher {
    address: String,
    client: Mutex<Option<EventsClient>>,
}

impl Publisher {
    /// Nothing is connected until the first event.
    pub fn new(address: String) -> Publisher {
        Publisher {
            address,
            client: Mutex::new(None),
        }
    }

    /// Sends `event` under `topic` in namespace `ns`; a send that fails on an old
    /// connection is tried once more on a new one.
    pub fn publish(&self, ns: &str, topic: &str, event: &dyn MessageDyn) -> Result<()> {
        let req = forward_request(ns, topic, event)?;
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = client.take() {
            match send(&c, &req) {
                Ok(()) => {
                    *client = Some(c);
                    return Ok(());
                }
                Err(e) => log::info!("publish {topic}: {e}; connecting to containerd again"),
            }
        }
        let c = self.connect()?;
        send(&c, &req).map_err(|e| ShimError::Command {
            what: format!("publish {topic} to {}", self.address),
            why: e.to_string(),
        })?;
        *client = Some(c);
        Ok(())
    }

    fn connect(&self) -> Result<EventsClient> {
        let what = || format!("connect to containerd's ttrpc socket {:?}", self.address);
        let stream = UnixStream::connect(&self.address).map_err(ShimError::io(what()))?;
        let client = protocol::blocking::client(stream).map_err(ShimError::io(what()))?;
        Ok(EventsClient::new(client))
    }
}

fn send(c: &EventsClient, req: &ForwardRequest) -> protocol::ttrpc::Result<()> {
    let ctx = context::with_timeout(SEND_TIMEOUT.as_nanos() as i64);
    protocol::blocking::block_on(c.forward(ctx, req)).map(drop)
}

/// containerd's envelope: the event as an Any named by its full protobuf name.
fn forward_request(ns: &str, topic: &str, event: &dyn MessageDyn) -> Result<ForwardRequest> {
    let value = event
        .write_to_bytes_dyn()
        .map_err(|e| ShimError::invalid(format!("event {topic}"), e.to_string()))?;
    let envelope = Envelope {
        timestamp: Some(Timestamp::from(SystemTime::now())).into(),
        namespace: ns.to_string(),
        topic: topic.to_string(),
        event: Some(Any {
            type_url: event.descriptor_dyn().full_name().to_string(),
            value,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    Ok(ForwardRequest {
        envelope: Some(envelope).into(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc;
    use std::sync::Arc;

    use containerd_shim::protos::api::Empty;
    use containerd_shim::protos::events::task::TaskExit;
    use containerd_shim::protos::protobuf::Message;
    use containerd_shim_protos::shim_sync::{create_events, Events};
    use protocol::ttrpc::{Server, TtrpcContext};

    use super::*;

    /// containerd's side: every envelope it is sent.
    struct Containerd(Mutex<mpsc::Sender<Envelope>>);

    impl Events for Containerd {
        fn forward(&self, _: &TtrpcContext, req: ForwardRequest) -> protocol::ttrpc::Result<Empty> {
            let _ = self
                .0
                .lock()
                .unwrap()
                .send(req.envelope.unwrap_or_default());
            Ok(Empty::new())
        }
    }

    fn serve(path: &Path) -> (Server, mpsc::Receiver<Envelope>) {
        let _ = std::fs::remove_file(path);
        let (tx, rx) = mpsc::channel();
        let mut server = Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_events(Arc::new(Containerd(Mutex::new(tx)))));
        server.start().unwrap();
        (server, rx)
    }

    fn exit(status: u32) -> TaskExit {
        TaskExit {
            container_id: "c1".into(),
            exit_status: status,
            ..Default::default()
        }
    }

    fn received(rx: &mpsc::Receiver<Envelope>) -> Envelope {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("no event arrived")
    }

    #[test]
    fn events_reach_containerd_also_after_it_restarts() {
        let path = std::env::temp_dir().join(format!("shim-events-{}.ttrpc", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p = Publisher::new(path.to_string_lossy().into_owned());
        let e = p.publish("k8s.io", "/tasks/exit", &exit(1)).unwrap_err();
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");

        let (server, rx) = serve(&path);
        p.publish("k8s.io", "/tasks/exit", &exit(7)).unwrap();
        let env = received(&rx);
        assert_eq!(
            (env.namespace.as_str(), env.topic.as_str()),
            ("k8s.io", "/tasks/exit")
        );
        assert!(env.timestamp.seconds > 0);
        assert_eq!(env.event.type_url, "containerd.events.TaskExit");
        let ev = TaskExit::parse_from_bytes(&env.event.value).unwrap();
        assert_eq!((ev.container_id.as_str(), ev.exit_status), ("c1", 7));

        // containerd restarts: the old connection is gone, the next event still arrives.
        server.shutdown();
        let (server, rx) = serve(&path);
        p.publish("k8s.io", "/tasks/exit", &exit(9)).unwrap();
        let ev = TaskExit::parse_from_bytes(&received(&rx).event.value).unwrap();
        assert_eq!(ev.exit_status, 9);
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }
}
