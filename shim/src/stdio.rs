//! Copies a process's stdio between containerd's FIFOs and the agent's stream calls. Output is
//! always drained, also without a reader, so a container never blocks on a full pipe.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;

use protocol::agent::ReadStreamRequest;
use protocol::agent_ttrpc::AgentClient;
use protocol::ttrpc::context;

use crate::stdin::Stdin;

/// Largest chunk moved per call.
const CHUNK: u32 = 64 * 1024;

/// Where containerd wants a process's stdio (empty = not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copying threads of one process; the output ones end at the process's end of stream.
#[derive(Debug, Default)]
pub struct Pumps {
    outputs: Vec<JoinHandle<()>>,
}

fn open_fifo_for_writing(path: &str) -> Option<File> {
    if path.is_empty() {
        return None;
    }
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("open {path}: {e}; output is discarded");
            None
        }
    }
}

fn pump_output(
    agent: AgentClient,
    container: String,
    exec_id: String,
    path: String,
    stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut sink = open_fifo_for_writing(&path);
        let req = ReadStreamRequest {
            container_id: container,
            exec_id,
            max_len: CHUNK,
            ..Default::default()
        };
        loop {
            let r = if stderr {
                agent.read_stderr(context::Context::default(), &req)
            } else {
                agent.read_stdout(context::Context::default(), &req)
            };
            let data = match r {
                Ok(r) if !r.data.is_empty() => r.data,
                Ok(_) => return,
                Err(e) => {
                    log::warn!("{}/{}: output stream: {e}", req.container_id, req.exec_id);
                    return;
                }
            };
            if let Some(f) = sink.as_mut() {
                if f.write_all(&data).is_err() {
                    sink = None; // the reader went away: keep draining
                }
            }
        }
    })
}

impl Pumps {
    pub fn start(
        agent: &AgentClient,
        container: &str,
        exec_id: &str,
        io: &StdioPaths,
        stdin: &Arc<Stdin>,
    ) -> Pumps {
        let mut outputs = vec![pump_output(
            agent.clone(),
            container.into(),
            exec_id.into(),
            io.stdout.clone(),
            false,
        )];
        if !io.terminal {
            outputs.push(pump_output(
                agent.clone(),
                container.into(),
                exec_id.into(),
                io.stderr.clone(),
                true,
            ));
        }
        crate::stdin::pump(
            agent.clone(),
            container.into(),
            exec_id.into(),
            stdin.clone(),
        );
        Pumps { outputs }
    }

    /// Waits until all output has reached containerd.
    pub fn finish(self) {
        for t in self.outputs {
            let _ = t.join();
        }
    }
}
