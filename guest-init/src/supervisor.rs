//! A small service supervisor: each service runs in its own thread that starts the process, waits for it
//! (through [`crate::proc`], so PID 1's reaper and the supervisor never race), and restarts it after a
//! crash with exponential backoff. A crashing or unstartable service only ever affects itself. Output lines
//! are forwarded to the log prefixed with the service name. Stopping sends SIGTERM, then SIGKILL after the
//! service's stop timeout.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// Restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long resets the delay to `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Delay before the next start, given the previous delay and how long the last run lasted.
    pub fn next_delay(&self, previous: Option<Duration>, ran_for: Duration) -> Duration {
        match previous {
            _ if ran_for >= self.reset_after => self.initial,
            None => self.initial,
            Some(p) => (p * 2).min(self.max),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub backoff: Backoff,
    pub stop_timeout: Duration,
}

impl ServiceSpec {
    pub fn new(name: &str, program: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            program: program.into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
            cwd: None,
            backoff: Backoff::default(),
            stop_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    pid: Option<i32>,
    starts: u32,
    stopping: bool,
    finished: bool,
}

/// A running service.
pub struct Service {
    spec: ServiceSpec,
    state: Mutex<State>,
    cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Service({})", self.spec.name)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn forward_lines(name: String, pipe: impl std::io::Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(l) => tracing::info!("[{name}] {l}"),
                Err(_) => break,
            }
        }
    });
}

impl Service {
    /// Starts supervising `spec` in a new thread.
    pub fn start(spec: ServiceSpec) -> Arc<Self> {
        let svc = Arc::new(Self {
            spec,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            thread: Mutex::new(None),
        });
        let runner = Arc::clone(&svc);
        let handle = std::thread::Builder::new()
            .name(format!("svc-{}", svc.spec.name))
            .spawn(move || runner.run());
        match handle {
            Ok(h) => *lock(&svc.thread) = Some(h),
            Err(e) => tracing::error!("service {}: cannot start its supervisor thread: {e}", svc.spec.name),
        }
        svc
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The current pid, if running.
    pub fn pid(&self) -> Option<i32> {
        lock(&self.state).pid
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        lock(&self.state).starts
    }

    fn run(&self) {
        let mut delay = None;
        loop {
            if lock(&self.state).stopping {
                break;
            }
            let started = Instant::now();
            let mut cmd = Command::new(&self.spec.program);
            cmd.args(&self.spec.args)
                .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(d) = &self.spec.cwd {
                cmd.current_dir(d);
            }
            // Register the pid under the state lock so `stop` never misses a just-started process.
            let spawned = {
                let mut st = lock(&self.state);
                if st.stopping {
                    break;
                }
                let r = crate::proc::spawn(&mut cmd);
                if let Ok(child) = &r {
                    st.pid = Some(child.pid());
                    st.starts += 1;
                }
                r
            };
            match spawned {
                Ok(mut child) => {
                    tracing::info!("service {}: started (pid {})", self.spec.name, child.pid());
                    if let Some(out) = child.child_mut().stdout.take() {
                        forward_lines(self.spec.name.clone(), out);
                    }
                    if let Some(err) = child.child_mut().stderr.take() {
                        forward_lines(self.spec.name.clone(), err);
                    }
                    let status = child.wait();
                    let mut st = lock(&self.state);
                    st.pid = None;
                    self.cv.notify_all();
                    if st.stopping {
                        tracing::info!("service {}: stopped ({status:?})", self.spec.name);
                        break;
                    }
                    drop(st);
                    tracing::warn!("service {}: exited unexpectedly ({status:?})", self.spec.name);
                }
                Err(e) => tracing::error!(
                    "service {}: cannot start {}: {e}",
                    self.spec.name,
                    self.spec.program.display()
                ),
            }
            let d = self.spec.backoff.next_delay(delay, started.elapsed());
            delay = Some(d);
            tracing::info!("service {}: restarting in {:.1} s", self.spec.name, d.as_secs_f64());
            let st = lock(&self.state);
            let _unused = self.cv.wait_timeout_while(st, d, |s| !s.stopping);
        }
        let mut st = lock(&self.state);
        st.finished = true;
        self.cv.notify_all();
    }

    /// Stops the service: SIGTERM, then SIGKILL after the stop timeout; returns once its thread ended.
    pub fn stop(&self) {
        let mut st = lock(&self.state);
        st.stopping = true;
        if let Some(pid) = st.pid {
            tracing::info!("service {}: sending SIGTERM to pid {pid}", self.spec.name);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        }
        self.cv.notify_all();
        let (mut st, timeout) = match self.cv.wait_timeout_while(st, self.spec.stop_timeout, |s| !s.finished) {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if timeout.timed_out() {
            if let Some(pid) = st.pid {
                tracing::warn!(
                    "service {}: did not stop in time, sending SIGKILL to pid {pid}",
                    self.spec.name
                );
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            st = match self.cv.wait_timeout_while(st, Duration::from_secs(5), |s| !s.finished) {
                Ok(r) => r.0,
                Err(p) => p.into_inner().0,
            };
        }
        drop(st);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

/// The set of supervised services, stopped in reverse start order.
#[derive(Debug, Default)]
pub struct Supervisor {
    services: Mutex<Vec<Arc<Service>>>,
}

impl Supervisor {
    pub fn start(&self, spec: ServiceSpec) -> Arc<Service> {
        let svc = Service::start(spec);
        lock(&self.services).push(Arc::clone(&svc));
        svc
    }

    /// Names in start order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.services).iter().map(|s| s.name().to_owned()).collect()
    }

    /// Stops one service by name (and forgets it).
    pub fn stop(&self, name: &str) {
        let svc = {
            let mut list = lock(&self.services);
            let idx = list.iter().position(|s| s.name() == name);
            idx.map(|i| list.remove(i))
        };
        if let Some(s) = svc {
            s.stop();
        }
    }

    /// Stops every service, last started first.
    pub fn stop_all(&self) {
        let list: Vec<Arc<Service>> = std::mem::take(&mut *lock(&self.services));
        for s in list.iter().rev() {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
            reset_after: Duration::from_secs(60),
        };
        let short = Duration::from_millis(10);
        let d1 = b.next_delay(None, short);
        let d2 = b.next_delay(Some(d1), short);
        let d3 = b.next_delay(Some(d2), short);
        let d4 = b.next_delay(Some(d3), short);
        assert_eq!([d1, d2, d3, d4].map(|d| d.as_secs()), [1, 2, 4, 5]);
        assert_eq!(b.next_delay(Some(d4), Duration::from_secs(61)), Duration::from_secs(1));
    }

    fn fast(mut spec: ServiceSpec) -> ServiceSpec {
        spec.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(50),
            reset_after: Duration::from_secs(60),
        };
        spec.stop_timeout = Duration::from_secs(2);
        spec
    }

    #[test]
    fn crashing_service_is_restarted_and_stops_cleanly() {
        let svc = Service::start(fast(ServiceSpec::new("crasher", "sh", &["-c", "exit 3"])));
        let deadline = Instant::now() + Duration::from_secs(10);
        while svc.starts() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(svc.starts() >= 3, "restarted {} times", svc.starts());
        svc.stop();
        let n = svc.starts();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(svc.starts(), n, "no restart after stop");
    }

    #[test]
    fn unstartable_service_does_not_panic() {
        let svc = Service::start(fast(ServiceSpec::new("missing", "/nonexistent/daemon", &[])));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(svc.starts(), 0);
        svc.stop();
    }

    #[test]
    fn stop_escalates_to_sigkill() {
        let mut spec = fast(ServiceSpec::new(
            "stubborn",
            "sh",
            &["-c", "trap '' TERM; while :; do sleep 0.05; done"],
        ));
        spec.stop_timeout = Duration::from_millis(300);
        let svc = Service::start(spec);
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc.pid().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        svc.stop();
        assert!(svc.pid().is_none());
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
