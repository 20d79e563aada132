//! Where the time of a pod's or container's start goes: named phases, logged on one line that
//! the pod-start benchmark reads (`... phases: network 3 ms, cgroup 1 ms, ...`).

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Phases {
    last: Instant,
    parts: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            last: Instant::now(),
            parts: Vec::new(),
        }
    }
}

impl Phases {
    /// Ends phase `name` now (it began where the previous one ended).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.parts.push((name, now - self.last));
        self.last = now;
    }

    /// `name 12 ms, other 3 ms, total 15 ms`, in microsecond-rounded milliseconds.
    pub fn line(&self) -> String {
        let total: Duration = self.parts.iter().map(|(_, d)| *d).sum();
        self.parts
            .iter()
            .chain([("total", total)].iter())
            .map(|(n, d)| format!("{n} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_to_the_total() {
        let mut p = Phases::default();
        std::thread::sleep(Duration::from_millis(2));
        p.mark("first");
        p.mark("second");
        let line = p.line();
        assert!(line.starts_with("first "), "{line}");
        assert!(
            line.contains(", second ") && line.contains(", total "),
            "{line}"
        );
        let total: f64 = line
            .rsplit("total ")
            .next()
            .and_then(|t| t.trim_end_matches(" ms").parse().ok())
            .unwrap();
        assert!(total >= 2.0, "{line}");
    }
}
