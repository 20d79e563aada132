//! Container creates and execs run libcontainer in a helper: this binary exec'd as
//! `kv-runtime`, with one thread. libcontainer clones the container's processes from the
//! process that calls it and runs Rust code in the clones (allocating, logging) until they
//! exec. Cloned from the agent, whose many threads may hold malloc's or the logger's lock at
//! that moment, a clone could wait on such a lock for ever and hang the request (and every
//! create and exec after it). A helper with no other thread cannot. The helper answers one
//! line on descriptor 3, `ok PID` or `err MESSAGE`, and exits; the container's processes
//! then belong to PID 1, the agent, whose reaper collects them.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{AgentError, Result};
use crate::init::RUN_DIR;
use crate::reaper::Exits;
use crate::reexec::{self, Layout};

/// The name the agent binary answers to as the helper (its argv[0]).
pub const NAME: &str = "kv-runtime";
/// The helper's answer pipe.
const ANSWER_FD: i32 = 3;
/// The longest answer read; a pipe holds it whole, so the helper never waits to write it.
const MAX_ANSWER: usize = 4096;
/// How long a helper may take before it is killed: far above a create under emulation.
const LIMIT: Duration = Duration::from_secs(120);

/// libcontainer's state directory (one directory per container).
pub fn runtime_root() -> PathBuf {
    Path::new(RUN_DIR).join("libcontainer")
}

/// What the helper is asked to build.
#[derive(Debug, Clone, Copy)]
pub enum Job<'a> {
    /// A container's init from the bundle (its `config.json`), stopped before exec.
    Create { bundle: &'a Path },
    /// Another process in a running container, from an OCI process file.
    Exec { process: &'a Path },
}

/// Runs `job` for container `id` in a helper whose stdin, stdout and stderr, inherited by
/// the new process, are `stdio`; with `console`, the process gets a terminal sent to that
/// socket instead. Returns the new process's PID. `what` names the job in errors.
pub fn run<'a>(
    exits: &Exits,
    what: &str,
    id: &str,
    job: Job<'a>,
    console: Option<&'a Path>,
    stdio: [OwnedFd; 3],
) -> Result<i32> {
    let runtime_err = |why: String| AgentError::Runtime {
        what: what.to_owned(),
        why,
    };
    let (op, path) = match job {
        Job::Create { bundle } => ("create", bundle),
        Job::Exec { process } => ("exec", process),
    };
    let utf8 = |p: &'a Path| {
        p.to_str()
            .ok_or_else(|| runtime_err(format!("{} is not UTF-8", p.display())))
    };
    let path = utf8(path)?;
    let console = console.map(utf8).transpose()?.unwrap_or("");
    let (answer, answer_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(AgentError::sys("create the runtime helper's pipe"))?;
    let fds = [
        stdio[0].as_raw_fd(),
        stdio[1].as_raw_fd(),
        stdio[2].as_raw_fd(),
        answer_w.as_raw_fd(),
    ];
    let args = [op, id, path, console];
    let pid = reexec::spawn(NAME, &args, &fds, CloneFlags::empty(), Layout::Fixed)?;
    // Only the helper and what it starts hold these now.
    drop((stdio, answer_w));
    let Some(exit) = exits.wait_for(pid.as_raw(), LIMIT) else {
        let _ = kill(pid, Signal::SIGKILL);
        exits.wait(pid.as_raw());
        exits.forget(pid.as_raw());
        return Err(runtime_err(format!(
            "the runtime helper gave no answer in {} s and was killed",
            LIMIT.as_secs()
        )));
    };
    exits.forget(pid.as_raw());
    // The helper wrote before it exited; the container's processes may still hold the
    // pipe open, so read without waiting for its end.
    fcntl(answer.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(AgentError::sys("read the runtime helper's answer"))?;
    let mut text = Vec::new();
    let _ = File::from(answer)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut text);
    parse_answer(&String::from_utf8_lossy(&text), exit.status).map_err(runtime_err)
}

/// `ok PID` or `err MESSAGE`; anything else is an error that says what came.
fn parse_answer(text: &str, status: i32) -> std::result::Result<i32, String> {
    if let Some(pid) = text.strip_prefix("ok ") {
        return pid
            .trim_end()
            .parse()
            .map_err(|_| format!("the runtime helper answered {text:?}"));
    }
    if let Some(why) = text.strip_prefix("err ") {
        return Err(why.trim_end().to_owned());
    }
    Err(format!(
        "the runtime helper ended with status {status} without an answer"
    ))
}

/// The helper's side: builds what the arguments ask for, answers and exits.
pub fn serve() -> ! {
    let _ = nix::sys::prctl::set_name(c"kv-runtime");
    // The container's processes are cloned from here with every descriptor: the answer
    // pipe must not outlive their exec.
    let _ = fcntl(ANSWER_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    std::panic::set_hook(Box::new(|info| {
        answer(&format!("err panicked: {info}\n"));
        std::process::exit(1)
    }));
    let args: Vec<String> = std::env::args().collect();
    // Started at fixed addresses (see reexec::Layout); the container's programs must not be.
    let built = reexec::randomize_from_here()
        .map_err(|e| LibcontainerError::Other(format!("restoring address randomization: {e}")))
        .and_then(|()| build(&args));
    let (line, code) = match built {
        Ok(pid) => (format!("ok {pid}\n"), 0),
        Err(e) => {
            let mut why = format!("err {e}");
            why.truncate(MAX_ANSWER - 1);
            (why + "\n", 1)
        }
    };
    answer(&line);
    std::process::exit(code)
}

/// Writes to the answer pipe, which the process keeps.
fn answer(line: &str) {
    // SAFETY: descriptor 3 is the answer pipe `run` put there; ManuallyDrop never closes it.
    let mut pipe = ManuallyDrop::new(unsafe { File::from_raw_fd(ANSWER_FD) });
    let _ = pipe.write_all(line.as_bytes());
}

fn build(args: &[String]) -> std::result::Result<Pid, LibcontainerError> {
    let [_, op, id, path, console] = args else {
        return Err(LibcontainerError::Other(format!(
            "usage: {NAME} create|exec ID BUNDLE|PROCESS CONSOLE_SOCKET, not {args:?}"
        )));
    };
    let console = (!console.is_empty()).then(|| PathBuf::from(console));
    let builder = ContainerBuilder::new(id.clone(), SyscallType::Linux)
        .with_root_path(runtime_root())?
        .with_console_socket(console);
    match op.as_str() {
        "create" => builder
            .as_init(path)
            .with_systemd(false)
            .with_detach(true)
            .build()?
            .pid()
            .ok_or_else(|| LibcontainerError::Other("no init pid".into())),
        "exec" => builder
            .as_tenant()
            .with_detach(true)
            .with_process(Some(path))
            .build(),
        other => Err(LibcontainerError::Other(format!("unknown job {other:?}"))),
    }
}

/// `/dev/null` three times: the stdio of a process that talks through a terminal.
pub fn null_stdio() -> Result<[OwnedFd; 3]> {
    let null = OwnedFd::from(File::open("/dev/null").map_err(AgentError::io("open /dev/null"))?);
    let dup = |fd: &OwnedFd| {
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(AgentError::io("duplicate /dev/null"))
    };
    Ok([dup(&null)?, dup(&null)?, null])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_and_anything_else_is_named() {
        assert_eq!(parse_answer("ok 42\n", 0), Ok(42));
        assert_eq!(
            parse_answer("err exec failed: no such file\n", 1),
            Err("exec failed: no such file".into())
        );
        let e = parse_answer("ok x\n", 0).unwrap_err();
        assert!(e.contains("\"ok x\\n\""), "{e}");
        let e = parse_answer("", 127).unwrap_err();
        assert!(e.contains("status 127 without an answer"), "{e}");
    }
}
