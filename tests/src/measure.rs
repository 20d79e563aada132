//! Process measurements for benchmarks: wall time exec -> exit, CPU time (wait4's rusage)
//! and peak RSS read from /proc at the moment the process exits (ptrace exit stop), which,
//! unlike ru_maxrss, excludes the forked parent's pages from before exec.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One run of a command.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub wall: Duration,
    /// Exec to the first byte on its stdout (for a VMM: the guest ran), if any came.
    pub first_output: Option<Duration>,
    pub cpu: Duration,
    pub peak_rss_kib: u64,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

fn hwm_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `cmd` to completion; `trace` reads its peak RSS at exit (at a small cost in wall
/// time, so timing runs leave it off). Returns the sample, the exit code and stdout.
pub fn run(mut cmd: Command, trace: bool) -> std::io::Result<(Sample, i32, Vec<u8>)> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    if trace {
        // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let (mut v, mut first) = (Vec::new(), None);
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    v.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (v, first)
    });
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut peak = 0;
    loop {
        // SAFETY: `pid` is our child; status and usage point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            break;
        }
        if libc::WIFSTOPPED(status) {
            let sig = libc::WSTOPSIG(status);
            let event = status >> 16;
            let pass = if event == libc::PTRACE_EVENT_EXIT {
                peak = hwm_kib(pid);
                0
            } else if sig == libc::SIGTRAP && peak == 0 && event == 0 {
                // The stop after exec: ask for a stop at exit too.
                let opts = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
                // SAFETY: `pid` is our stopped tracee.
                unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts) };
                0
            } else {
                sig
            };
            // SAFETY: `pid` is our stopped tracee.
            unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, pass) };
        }
    }
    let wall = start.elapsed();
    let (out, first) = reader.join().unwrap_or_default();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let sample = Sample {
        wall,
        first_output: first.map(|t| t.duration_since(start)),
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak_rss_kib: peak,
    };
    Ok((sample, code, out))
}

/// Median of a non-empty list.
pub fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// CPU time of this whole process so far (all threads, live and ended).
pub fn self_cpu() -> Duration {
    // SAFETY: zeroed rusage is valid; getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_output_is_when_the_first_byte_came() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 0.2; printf K; sleep 0.1"]);
        let (s, code, out) = run(cmd, false).unwrap();
        assert_eq!((code, out.as_slice()), (0, b"K".as_slice()));
        let first = s.first_output.expect("a byte came");
        assert!(first >= Duration::from_millis(200), "{first:?}");
        assert!(s.wall >= first + Duration::from_millis(100), "{s:?}");
        let (silent, _, _) = run(Command::new("true"), false).unwrap();
        assert_eq!(silent.first_output, None);
    }
}
