//! Helpers shared by the tests that run the `kv-server` binary: temporary
//! directories, free loopback addresses, replica files, and signals to and
//! checks on the processes they start.

// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kv-server-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random loopback address of 127.0.0.0/8 other than 127.0.0.1, for one
/// test cluster. Ports found free on it cannot be taken meanwhile by the
/// ephemeral source ports of other tests' connections (those use
/// 127.0.0.1), so parallel tests do not collide.
pub fn cluster_ip() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!(
        "127.{}.{}.{}",
        rng.random_range(1..=254u8),
        rng.random_range(0..=255u8),
        rng.random_range(1..=254u8)
    )
}

/// `n` distinct ports free on `ip`: all bound at once, then released.
pub fn free_ports_on(ip: &str, n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A valid replica file of `n` replicas on free ports of a fresh loopback
/// address: its text and the replicas' client addresses.
pub fn replica_file(n: usize) -> (String, Vec<String>) {
    let ip = cluster_ip();
    let ports = free_ports_on(&ip, 2 * n);
    let mut text = String::from("# test cluster\n");
    let mut clients = Vec::new();
    for i in 0..n {
        let client = format!("{ip}:{}", ports[2 * i]);
        text.push_str(&format!("{} {client} {ip}:{}\n", i + 1, ports[2 * i + 1]));
        clients.push(client);
    }
    (text, clients)
}

/// Sends `signal` to `pid`.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `pid` is a live kv-server process (not gone, not a zombie, not
/// a reused pid now belonging to something else).
pub fn is_running_kv_server(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    if matches!(state.and_then(|s| s.chars().next()), Some('Z') | Some('X')) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("kv-server"))
        .unwrap_or(false)
}

/// Waits up to `limit` for every pid to be gone; returns those still running.
pub fn wait_gone<'a>(pids: impl IntoIterator<Item = &'a u32> + Clone, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let alive: Vec<u32> = pids
            .clone()
            .into_iter()
            .copied()
            .filter(|&p| is_running_kv_server(p))
            .collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
