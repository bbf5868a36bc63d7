//! A server's cost from `/proc`: CPU time (user, system) from `/proc/PID/stat`, and per thread
//! from `/proc/PID/task/*/stat`; memory (VmRSS, VmHWM) and threads from `/proc/PID/status`, open
//! file descriptors (`/proc/PID/fd`); the machine's busy time (`/proc/stat`, to see what else ran during a window); the kernel's socket
//! and slab memory (`/proc/net/sockstat`, `/proc/meminfo`); and raising this process's open-files
//! limit.

use std::collections::BTreeMap;

use serde_json::{json, Value};

type Res<T> = Result<T, String>;

/// One reading of a process's CPU time and memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User CPU time in microseconds (all threads).
    pub user_us: u64,
    /// System CPU time in microseconds (all threads).
    pub sys_us: u64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Peak resident set size in KiB.
    pub hwm_kib: u64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of utime and stime.
fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// A `stat` file's command name and CPU time in clock ticks: (comm, utime, stime).
fn parse_stat(stat: &str) -> Option<(&str, u64, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses itself:
    // it runs from the first '(' to the last ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse().ok());
    Some((comm, field(14)?, field(15)?))
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample(pid: u32) -> Res<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let (_, utime, stime) = parse_stat(&stat).ok_or(format!("/proc/{pid}/stat: unparsable"))?;
    let tps = ticks_per_sec();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        user_us: utime * 1_000_000 / tps,
        sys_us: stime * 1_000_000 / tps,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// One reading of the CPU time of each of a process's threads, by thread id.
pub type ThreadSamples = BTreeMap<u32, ThreadCpu>;

/// A thread's name and CPU time so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCpu {
    /// Its name (`/proc/PID/task/TID/comm`, at most 15 bytes).
    pub name: String,
    /// User CPU time in microseconds.
    pub user_us: u64,
    /// System CPU time in microseconds.
    pub sys_us: u64,
}

/// Reads `/proc/PID/task/*/stat`. A thread that ends while the directory is read is skipped.
pub fn thread_samples(pid: u32) -> Res<ThreadSamples> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let tps = ticks_per_sec();
    let mut out = BTreeMap::new();
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((name, utime, stime)) = parse_stat(&stat) {
            out.insert(
                tid,
                ThreadCpu {
                    name: name.to_string(),
                    user_us: utime * 1_000_000 / tps,
                    sys_us: stime * 1_000_000 / tps,
                },
            );
        }
    }
    Ok(out)
}

/// The CPU a process's threads spent between two readings, by thread name (threads of one name,
/// such as a runtime's workers, are summed), per delivery: `{name: {threads, user_us_per_delivery,
/// sys_us_per_delivery}}`, for the names that spent any. Only threads alive at both readings
/// count (matched by thread id, under their name at the second), so the sum can be below the
/// process's figure. `null` without deliveries.
pub fn threads_json(before: &ThreadSamples, after: &ThreadSamples, deliveries: u64) -> Value {
    if deliveries == 0 {
        return Value::Null;
    }
    let mut by_name: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for (tid, now) in after {
        let Some(then) = before.get(tid) else {
            continue;
        };
        let e = by_name.entry(&now.name).or_default();
        e.0 += 1;
        e.1 += now.user_us.saturating_sub(then.user_us);
        e.2 += now.sys_us.saturating_sub(then.sys_us);
    }
    let per = |us: u64| us as f64 / deliveries as f64;
    Value::Object(
        by_name
            .into_iter()
            .filter(|(_, (_, user, sys))| user + sys > 0)
            .map(|(name, (threads, user, sys))| {
                (
                    name.to_string(),
                    json!({
                        "threads": threads,
                        "user_us_per_delivery": per(user),
                        "sys_us_per_delivery": per(sys),
                    }),
                )
            })
            .collect(),
    )
}

/// The threads of a process (`/proc/PID/status` `Threads:`).
pub fn threads(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|r| r.trim().parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no Threads"))
}

/// The open file descriptors of a process (entries of `/proc/PID/fd`; needs the same user).
pub fn open_fds(pid: u32) -> Res<u64> {
    let dir =
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("/proc/{pid}/fd: {e}"))?;
    Ok(dir.filter(|e| e.is_ok()).count() as u64)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft
/// limit.
pub fn raise_nofile() -> Res<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to write to / read from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(lim.rlim_cur)
}

/// The CPU a process spent between two samples over a window of `window_secs`: user and system
/// µs in total and per delivery (`null` without deliveries), and CPU % of one core.
pub fn cpu_json(before: &Sample, after: &Sample, window_secs: f64, deliveries: u64) -> Value {
    let user = after.user_us.saturating_sub(before.user_us);
    let sys = after.sys_us.saturating_sub(before.sys_us);
    let per = |us: u64| {
        if deliveries == 0 {
            Value::Null
        } else {
            json!(us as f64 / deliveries as f64)
        }
    };
    json!({
        "user_us": user,
        "sys_us": sys,
        "user_us_per_delivery": per(user),
        "sys_us_per_delivery": per(sys),
        "total_us_per_delivery": per(user + sys),
        "cpu_percent": (user + sys) as f64 / window_secs / 1e4,
    })
}

/// System-wide kernel memory figures that grow with open sockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel {
    /// `/proc/net/sockstat` TCP `inuse`: TCP sockets (both ends of a loopback connection).
    pub tcp_inuse: u64,
    /// TCP `alloc`: TCP sockets allocated (including orphans and time-wait).
    pub tcp_alloc: u64,
    /// TCP `mem`: pages charged to TCP socket buffers.
    pub tcp_mem_pages: u64,
    /// `/proc/meminfo` `Slab` (kernel object caches: sockets, files, dentries…) in KiB.
    pub slab_kib: u64,
    /// The page size in bytes (`sysconf(_SC_PAGESIZE)`).
    pub page_bytes: u64,
}

/// Reads `/proc/net/sockstat` (`TCP: inuse X orphan Y tw Z alloc A mem M`) and `/proc/meminfo`.
pub fn kernel() -> Res<Kernel> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")
        .map_err(|e| format!("/proc/net/sockstat: {e}"))?;
    let tcp: Vec<&str> = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .ok_or("/proc/net/sockstat: no TCP line")?
        .split_whitespace()
        .collect();
    let field = |key: &str| -> Res<u64> {
        tcp.iter()
            .position(|w| *w == key)
            .and_then(|i| tcp.get(i + 1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/net/sockstat: no TCP {key}"))
    };
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    let slab_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or("/proc/meminfo: no Slab")?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(Kernel {
        tcp_inuse: field("inuse")?,
        tcp_alloc: field("alloc")?,
        tcp_mem_pages: field("mem")?,
        slab_kib,
        page_bytes: if page > 0 { page as u64 } else { 4096 },
    })
}

/// The whole machine's CPU time from the `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Machine {
    /// Ticks not idle and not waiting for I/O (user, nice, system, irq, softirq, steal).
    pub busy: u64,
    /// All ticks, summed over the CPUs.
    pub total: u64,
    /// CPUs online.
    pub cpus: u64,
}

/// Reads `/proc/stat`.
pub fn machine() -> Res<Machine> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let mut lines = stat.lines();
    let v: Vec<u64> = lines
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or("/proc/stat: no cpu line")?
        .split_whitespace()
        .take(8)
        .filter_map(|n| n.parse().ok())
        .collect();
    if v.len() < 5 {
        return Err("/proc/stat: short cpu line".into());
    }
    let total: u64 = v.iter().sum();
    let cpus = lines.filter(|l| l.starts_with("cpu")).count() as u64;
    Ok(Machine {
        busy: total - v[3] - v[4],
        total,
        cpus: cpus.max(1),
    })
}

/// Between two readings: `busy_cores` (the average number of busy CPUs over the window) and,
/// given the server's and the load generator's samples over the same window, `others_cores`
/// (what every other process on the machine used: builds, other sessions).
pub fn context_json(
    m0: &Machine,
    m1: &Machine,
    server: (&Sample, &Sample),
    loadgen: (&Sample, &Sample),
    window_secs: f64,
) -> Value {
    let dt = m1.total.saturating_sub(m0.total);
    let busy_cores = if dt == 0 {
        0.0
    } else {
        m1.busy.saturating_sub(m0.busy) as f64 / dt as f64 * m1.cpus as f64
    };
    let cores = |(a, b): (&Sample, &Sample)| {
        (b.user_us + b.sys_us).saturating_sub(a.user_us + a.sys_us) as f64 / 1e6 / window_secs
    };
    let (srv, gen) = (cores(server), cores(loadgen));
    json!({
        "cpus": m1.cpus,
        "busy_cores": busy_cores,
        "server_cores": srv,
        "load_generator_cores": gen,
        "others_cores": (busy_cores - srv - gen).max(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_parses_whatever_the_command_name_holds() {
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 3 0";
        assert_eq!(parse_stat(line), Some(("a (b) c", 250, 17)));
        assert_eq!(parse_stat("42 (short) S 1 2"), None);
    }

    /// The calling thread's CPU time in µs (`CLOCK_THREAD_CPUTIME_ID`).
    fn own_cpu_us() -> u64 {
        // SAFETY: clock_gettime writes the zeroed timespec it is given and reads nothing else.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
    }

    #[test]
    fn a_busy_thread_shows_under_its_own_name() {
        let pid = std::process::id();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("procstat-busy".into())
            .spawn(move || {
                // Named by now: the name is set before this closure runs.
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                // 300 ms of CPU, however long that takes on a loaded machine.
                let from = own_cpu_us();
                while own_cpu_us() - from < 300_000 {
                    std::hint::black_box(from);
                }
                // Stay alive for the second reading.
                stop_rx.recv().unwrap();
            })
            .unwrap();
        let of = |s: &ThreadSamples| -> u64 {
            s.values()
                .filter(|t| t.name == "procstat-busy")
                .map(|t| t.user_us + t.sys_us)
                .sum()
        };
        ready_rx.recv().unwrap();
        let before = thread_samples(pid).unwrap();
        go_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let after = loop {
            let now = thread_samples(pid).unwrap();
            if of(&now) >= of(&before) + 200_000 || std::time::Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        stop_tx.send(()).unwrap();
        busy.join().unwrap();
        let r = threads_json(&before, &after, 1000);
        let busy = &r["procstat-busy"];
        assert_eq!(busy["threads"].as_u64(), Some(1), "{r}");
        let cpu = busy["user_us_per_delivery"].as_f64().unwrap()
            + busy["sys_us_per_delivery"].as_f64().unwrap();
        assert!(cpu >= 200.0, "at least 200 ms over 1,000 deliveries: {r}");
        assert_eq!(threads_json(&before, &after, 0), Value::Null);
    }
}
