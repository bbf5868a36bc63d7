//! A server's cost from `/proc`: CPU time (user, system) from `/proc/PID/stat` and memory
//! (VmRSS, VmHWM) from `/proc/PID/status`; and raising this process's open-files limit.

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
