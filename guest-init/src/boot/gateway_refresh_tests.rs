use super::*;

fn policy() -> RefreshPolicy {
    RefreshPolicy {
        interval: Duration::from_secs(60),
        check_every: Duration::from_secs(5),
        probe_after: Duration::from_secs(25),
        probe_timeout: Duration::from_secs(10),
        retry_min: Duration::from_secs(2),
        retry_max: Duration::from_secs(60),
    }
}

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn periodic_refresh_is_jittered_within_ten_percent() {
    let t0 = Instant::now();
    for (u, at) in [(0.0, 54), (0.5, 60), (0.999_999, 66)] {
        let mut m = Monitor::new(policy(), t0, u);
        // A healthy tunnel (fresh handshakes) until just before the deadline.
        assert_eq!(m.tick(t0 + S(at) - Duration::from_millis(1), Some(S(1))), Action::Idle);
        assert_eq!(
            m.tick(t0 + S(at), Some(S(1))),
            Action::Register(Reason::Periodic),
            "u = {u}"
        );
    }
}

#[test]
fn silent_tunnel_is_probed_then_reregistered_before_the_period() {
    let t0 = Instant::now();
    let mut m = Monitor::new(policy(), t0, 0.5);
    // The gateway answered a handshake at t0 + 2 s, then forgot us.
    let age = |t: u64| Some(S(t - 2));
    assert_eq!(m.tick(t0 + S(20), age(20)), Action::Idle);
    assert_eq!(m.tick(t0 + S(27), age(27)), Action::Probe, "25 s without a handshake");
    assert_eq!(m.tick(t0 + S(32), age(32)), Action::Idle, "the probe has 10 s");
    match m.tick(t0 + S(37), age(37)) {
        Action::Register(Reason::HandshakeLost { quiet, probe }) => {
            assert_eq!((quiet, probe), (S(35), S(10)));
        }
        other => panic!("expected a re-registration, got {other:?}"),
    }
    let text = Reason::HandshakeLost {
        quiet: S(35),
        probe: S(10),
    }
    .to_string();
    assert!(text.contains("no WireGuard handshake for 35s"), "{text}");
}

#[test]
fn answered_probe_keeps_the_registration() {
    let t0 = Instant::now();
    let mut m = Monitor::new(policy(), t0, 0.5);
    assert_eq!(m.tick(t0 + S(26), Some(S(26))), Action::Probe);
    // The handshake completed one second after the probe.
    assert_eq!(m.tick(t0 + S(31), Some(S(4))), Action::Idle);
    assert_eq!(m.tick(t0 + S(41), Some(S(14))), Action::Idle);
    // Silent again later: a new probe, not a re-registration.
    assert_eq!(m.tick(t0 + S(53), Some(S(26))), Action::Probe);
}

#[test]
fn no_handshake_ever_counts_from_the_registration() {
    let t0 = Instant::now();
    let mut m = Monitor::new(policy(), t0, 0.5);
    assert_eq!(m.tick(t0 + S(20), None), Action::Idle);
    assert_eq!(m.tick(t0 + S(25), None), Action::Probe);
    assert!(matches!(
        m.tick(t0 + S(35), None),
        Action::Register(Reason::HandshakeLost { .. })
    ));
    // A re-registration restarts the count even though the old handshake is stale: it initiated its own.
    m.registered(t0 + S(36), 0.5);
    assert_eq!(m.tick(t0 + S(50), Some(S(200))), Action::Idle);
    assert_eq!(m.tick(t0 + S(61), Some(S(211))), Action::Probe);
}

#[test]
fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
    let t0 = Instant::now();
    let mut m = Monitor::new(policy(), t0, 0.5);
    let mut now = t0 + S(60);
    let mut waits = Vec::new();
    for _ in 0..8 {
        assert!(matches!(m.tick(now, None), Action::Register(_)));
        let wait = m.failed(now, 0.999_999_9);
        waits.push(wait.as_secs_f64().round() as u64);
        // During the backoff a silent tunnel does not trigger anything.
        assert_eq!(m.tick(now + wait / 2, None), Action::Idle);
        now += wait;
        assert_eq!(
            m.tick(now, None),
            Action::Register(Reason::Retry { failures: m.failures() })
        );
    }
    assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    // Equal jitter: between half and all of the step.
    let mut lo = Monitor::new(policy(), t0, 0.5);
    assert_eq!(lo.failed(t0, 0.0), S(1));
    assert_eq!(lo.failed(t0, 0.0), S(2));
    // Success resets the backoff and returns to the periodic schedule.
    m.registered(now, 0.5);
    assert_eq!(m.failures(), 0);
    assert_eq!(m.tick(now + S(59), Some(S(1))), Action::Idle);
    assert_eq!(m.tick(now + S(60), Some(S(1))), Action::Register(Reason::Periodic));
}

#[test]
fn jitter_is_in_the_unit_interval_and_varies() {
    let draws: Vec<f64> = (0..64).map(|_| jitter()).collect();
    assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
    assert!(draws.windows(2).any(|w| w[0] != w[1]));
}
