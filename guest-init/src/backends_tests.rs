//! The guest API wiring: served beside the agent on the configured listener, `Shutdown` reaching the power-off
//! hook, and every failure to serve it leaving the boot alone.

use std::sync::atomic::{AtomicU32, Ordering};

use dstack_guest_agent::simulate::{DEFAULT_APP_COMPOSE, simulated_agent};
use dstack_rpc::Client;
use dstack_rpc::guest_api::GuestApiClient;

use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn fake_virtio_device(root: &Path, name: &str, id: &str) {
    let d = root.join("sys/bus/virtio/devices").join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("device"), id).unwrap();
}

#[test]
fn vsock_device_is_found_by_its_virtio_id() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!has_vsock_device(dir.path()), "no sysfs at all");
    // virtio-blk (2) and virtio-rng (4) are not sockets.
    fake_virtio_device(dir.path(), "virtio0", "0x0002\n");
    fake_virtio_device(dir.path(), "virtio1", "0x0004\n");
    assert!(!has_vsock_device(dir.path()));
    // sysfs prints the ID as "0x%04x\n"; 19 is the socket device.
    fake_virtio_device(dir.path(), "virtio2", "0x0013\n");
    assert!(has_vsock_device(dir.path()));
}

#[test]
fn guest_api_serves_info_and_shutdown_runs_the_power_off_hook() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = rt
        .block_on(simulated_agent(&dir.path().join("sim"), DEFAULT_APP_COMPOSE))
        .unwrap();
    let agent = Arc::new(agent);
    let sock = dir.path().join("run/guest-api.sock");
    let count = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&count);
    let setup = GuestApiSetup {
        listen: GuestApiListen::Unix(sock.clone()),
        on_shutdown: Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        }),
    };
    let status = start_guest_api(rt.handle(), dir.path(), Arc::clone(&agent), setup);
    assert_eq!(status, GuestApiStatus::Serving(format!("unix:{}", sock.display())));

    let c = GuestApiClient::new(Client::unix(&sock, "/api"));
    let info = rt.block_on(c.info()).unwrap();
    assert_eq!(info.app_id, agent.config().app_id);
    assert_eq!(info.instance_id, agent.config().instance_id);
    rt.block_on(c.shutdown()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "Shutdown never ran the hook");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn guest_api_is_skipped_without_a_vsock_device_and_bind_failures_are_not_fatal() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = rt
        .block_on(simulated_agent(&dir.path().join("sim"), DEFAULT_APP_COMPOSE))
        .unwrap();
    let agent = Arc::new(agent);
    let hook: ShutdownAction = Arc::new(|| panic!("Shutdown must not run here"));
    let with = |listen| GuestApiSetup {
        listen,
        on_shutdown: Arc::clone(&hook),
    };
    // The default listener is vsock 8000; a root whose sysfs has no virtio-vsock device skips it.
    assert_eq!(GuestApiSetup::default().listen, GuestApiListen::Vsock(8000));
    let st = start_guest_api(
        rt.handle(),
        dir.path(),
        Arc::clone(&agent),
        with(GuestApiListen::Vsock(GUEST_API_PORT)),
    );
    assert!(
        matches!(&st, GuestApiStatus::NotServed(w) if w.contains("virtio-vsock")),
        "{st:?}"
    );
    let st = start_guest_api(rt.handle(), dir.path(), Arc::clone(&agent), with(GuestApiListen::Off));
    assert!(matches!(st, GuestApiStatus::NotServed(_)), "{st:?}");
    // A socket path under a regular file cannot be bound: reported, not a panic or an error.
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let bad = dir.path().join("file/guest-api.sock");
    let st = start_guest_api(rt.handle(), dir.path(), agent, with(GuestApiListen::Unix(bad)));
    assert!(
        matches!(&st, GuestApiStatus::BindFailed(e) if e.contains("guest-api.sock")),
        "{st:?}"
    );
}
