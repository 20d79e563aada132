//! Per-container and per-process state the shim keeps for containerd: status, exit, stdio.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use crate::pod::Pod;
use crate::stdin::Stdin;
use crate::stdio::StdioPaths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at_unix_ns: i64,
}

#[derive(Debug)]
struct ProcState {
    status: Status,
    pid: u32,
    exit: Option<ExitInfo>,
}

/// A container's init process (exec id "") or an exec.
#[derive(Debug)]
pub struct Proc {
    pub exec_id: String,
    pub io: StdioPaths,
    /// The OCI process (JSON) of an exec.
    pub spec: Vec<u8>,
    /// The stdin FIFO, open from creation, and containerd's CloseIO for its pump.
    pub stdin: Arc<Stdin>,
    state: Mutex<ProcState>,
    exited: Condvar,
}

impl Proc {
    pub fn new(exec_id: &str, io: StdioPaths, spec: Vec<u8>) -> std::io::Result<Arc<Proc>> {
        let stdin = Arc::new(Stdin::open(&io.stdin)?);
        Ok(Arc::new(Proc {
            stdin,
            exec_id: exec_id.to_owned(),
            io,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                exit: None,
            }),
            exited: Condvar::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn started(&self, pid: u32) {
        let mut s = self.lock();
        s.status = Status::Running;
        s.pid = pid;
    }

    pub fn set_paused(&self, paused: bool) {
        let mut s = self.lock();
        if s.status != Status::Stopped {
            s.status = if paused {
                Status::Paused
            } else {
                Status::Running
            };
        }
    }

    pub fn exit(&self, e: ExitInfo) {
        let mut s = self.lock();
        s.status = Status::Stopped;
        s.exit = Some(e);
        self.exited.notify_all();
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.lock().exit
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> ExitInfo {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.exit {
                return e;
            }
            s = self.exited.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A container of the pod.
#[derive(Debug)]
pub struct Task {
    pub id: String,
    pub bundle: String,
    pub pod: Arc<Pod>,
    /// The pod VM's disk slot holding this container's image.
    pub slot: String,
    pub init: Arc<Proc>,
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Task {
    pub fn process(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            return Some(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
    }
}
