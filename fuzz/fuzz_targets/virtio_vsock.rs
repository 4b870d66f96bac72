#![no_main]
//! virtio-vsock device rounds (host sockets, guest TX, guest RX) on guest-controlled descriptor tables (see
//! `common/virtio.rs`): packets parsed from guest memory, connection requests to a host echo service and to
//! ports nobody listens on. Never panics; connection state stays bounded.
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use dstack_host_vmm::virtio::Interrupt;
use dstack_host_vmm::virtio::vsock::muxer::{Muxer, bind_listener};
use dstack_host_vmm::virtio::vsock::step;
use libfuzzer_sys::fuzz_target;

#[path = "common/virtio.rs"]
mod common;

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&self, _: u16) {}
    fn config(&self) {}
}

/// The device's host listener and an echo service on host port 1234 (`<uds>_1234`), created once.
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dstack-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let uds = dir.join("v.sock");
        let listener = bind_listener(&uds).expect("bind");
        let echo = UnixListener::bind(dir.join("v.sock_1234")).expect("bind echo");
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (uds, listener)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = common::setup(data, 2) else {
        return;
    };
    let (uds, listener) = host();
    let mut muxer = Muxer::new(3, uds.clone(), listener.try_clone().expect("clone listener"));
    for _ in 0..3 {
        step(&mut muxer, &mut s.queues, &s.mem, &NoIrq);
    }
    assert!(muxer.connection_count() <= 2 * usize::from(common::MAX_QUEUE), "{}", muxer.connection_count());
});
