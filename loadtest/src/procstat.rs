//! A server's cost from `/proc`: CPU time (user, system) from `/proc/PID/stat`, memory (VmRSS,
//! VmHWM) and threads from `/proc/PID/status`, open file descriptors (`/proc/PID/fd`); the
//! machine's busy time (`/proc/stat`, to see what else ran during a window); the kernel's socket
//! and slab memory (`/proc/net/sockstat`, `/proc/meminfo`); and raising this process's open-files
//! limit.

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

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample(pid: u32) -> Res<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("unparsable /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let field = |n: usize| -> Res<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {n}"))
    };
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
        user_us: field(14)? * 1_000_000 / tps,
        sys_us: field(15)? * 1_000_000 / tps,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
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
