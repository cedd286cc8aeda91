//! Operating-system helpers: the open-file limit, the CPU affinity mask, socket options, the
//! monotonic clock, and CPU time and memory read from `/proc`.
//!
//! Everything goes through `rustix` (safe wrappers), since the crate forbids `unsafe`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let current = getrlimit(Resource::Nofile);
    if let Some(max) = current.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The number of CPUs in this process's affinity mask (`sched_getaffinity`), at least 1.
pub fn affinity_cpus() -> usize {
    rustix::thread::sched_getaffinity(None)
        .map(|set| set.count() as usize)
        .unwrap_or(1)
        .max(1)
}

/// Sets `TCP_QUICKACK` so the kernel acknowledges what was just read at once instead of delaying
/// the ACK (on loopback, delayed ACKs otherwise throttle the sender). Errors are ignored.
#[inline]
pub fn quickack(fd: impl AsFd) {
    let _ = rustix::net::sockopt::set_tcp_quickack(fd, true);
}

/// Nanoseconds on `CLOCK_MONOTONIC`: one clock for every thread of this process (and for other
/// processes on the machine, which lets receivers recognise stale messages from earlier runs).
#[inline]
pub fn mono_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The source address to bind connection `i` to so that many connections to a loopback target
/// spread over `127.0.0.2 ..= 127.0.0.(1 + spread)` (each address has its own port range).
///
/// `None` when spreading is off (`spread == 0`) or the target is not on loopback.
pub fn spread_source(target: SocketAddr, i: usize, spread: usize) -> Option<SocketAddr> {
    if spread == 0 || !target.ip().is_loopback() || !target.is_ipv4() {
        return None;
    }
    let last = 2 + (i % spread.min(250)) as u8;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
        0,
    ))
}

/// Clock ticks per second for the times in `/proc/<pid>/stat`.
fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// User and system CPU seconds of one process, from `/proc/<pid>/stat`.
fn stat_cpu_secs(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace();
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// The parent pid of a process, from `/proc/<pid>/stat`.
fn parent_pid(pid: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its direct children (nginx runs its worker as a child of the master, so a
/// server's cost is the sum over both).
pub fn process_family(pid: u32) -> Vec<u32> {
    let mut family = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if parent_pid(name) == Some(pid)
                && let Ok(child) = name.parse()
            {
                family.push(child);
            }
        }
    }
    family
}

/// CPU seconds (user + system) used so far by `pid` and its direct children; `None` if `pid`
/// is gone.
pub fn server_cpu_secs(pid: u32) -> Option<f64> {
    let mut total = stat_cpu_secs(&pid.to_string())?;
    for child in process_family(pid).into_iter().skip(1) {
        total += stat_cpu_secs(&child.to_string()).unwrap_or(0.0);
    }
    Some(total)
}

/// Resident memory in bytes (`VmRSS`) of `pid` and its direct children; `None` if `pid` is gone.
pub fn server_rss_bytes(pid: u32) -> Option<u64> {
    let mut total = 0;
    let mut found = false;
    for member in process_family(pid) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{member}/status")) else {
            continue;
        };
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("VmRSS:") {
                let kb: u64 = value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kb * 1024;
                found |= member == pid;
            }
        }
    }
    found.then_some(total)
}

/// CPU seconds (user + system) used so far by this process (all its threads): the same sum
/// `getrusage(RUSAGE_SELF)` gives.
/// Uses `CLOCK_PROCESS_CPUTIME_ID` (nanosecond resolution).
pub fn self_cpu_secs() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Busy and total jiffies of every CPU, from `/proc/stat` (`cpuN` lines): busy is everything
/// but idle and iowait.
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|line| {
            let values: Vec<u64> = line
                .split_ascii_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let total: u64 = values.iter().take(8).sum();
            let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}
