//! Where a hung process tree waits: each thread's name, state and kernel wait channel, so a
//! test that times out on a stuck VMM says which thread blocked where.

use std::fs;

/// One line per thread of `pid` and of its descendants.
pub fn report(pid: u32) -> String {
    let mut out = String::new();
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        let cmd = read(&format!("/proc/{p}/cmdline")).replace('\0', " ");
        out.push_str(&format!(
            "process {p}: {}\n",
            cmd.chars().take(120).collect::<String>()
        ));
        for t in tasks.flatten() {
            let dir = t.path();
            let field = |f: &str| read(&dir.join(f).to_string_lossy());
            let state = field("stat")
                .rsplit(") ")
                .next()
                .and_then(|s| s.split(' ').next())
                .unwrap_or("?")
                .to_string();
            let stack: Vec<String> = field("stack")
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .take(6)
                .collect();
            out.push_str(&format!(
                "  {} {} {state} wchan={} [{}]\n",
                t.file_name().to_string_lossy(),
                field("comm").trim(),
                field("wchan"),
                stack.join(" < ")
            ));
            for c in field("children").split_whitespace() {
                if let Ok(c) = c.parse() {
                    pending.push(c);
                }
            }
        }
    }
    out
}

/// How many threads process `pid` has, by thread name (empty if it is gone).
pub fn by_name(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return names;
    };
    for t in tasks.flatten() {
        let name = read(&t.path().join("comm").to_string_lossy());
        *names.entry(name.trim().to_string()).or_insert(0) += 1;
    }
    names
}

/// The name of the shim's call threads (`shim/src/main.rs`), which leave after 5 s idle.
pub const SHIM_CALL: &str = "shim-call";

/// The threads of shim `pid` by name once its call threads have left: `Err` with the last
/// count if they are still there after `limit`.
pub fn once_calls_left(
    pid: u32,
    limit: std::time::Duration,
) -> Result<std::collections::BTreeMap<String, usize>, std::collections::BTreeMap<String, usize>> {
    let t0 = std::time::Instant::now();
    loop {
        let names = by_name(pid);
        if !names.contains_key(SHIM_CALL) {
            return Ok(names);
        }
        if t0.elapsed() > limit {
            return Err(names);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `name` or `name x3`, comma-separated, for a report.
pub fn summary(names: &std::collections::BTreeMap<String, usize>) -> String {
    let each: Vec<String> = names
        .iter()
        .map(|(name, n)| match n {
            1 => name.clone(),
            n => format!("{name} x{n}"),
        })
        .collect();
    each.join(", ")
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
