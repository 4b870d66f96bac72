//! Graceful `ShutdownVm` on the `tcg` backend: the manager presses the ACPI power button through the VM's
//! QMP socket and waits for the VM process to exit by itself. The "VM" here is a stand-in for QEMU + a
//! guest that honours the button: a python3 script serving QMP on `<workdir>/qmp.sock` that exits 0 on
//! `system_powerdown` (python3 from PATH; loud SKIP when absent, failure under DSTACK_REQUIRE_FIXTURES=1).
//! Real QEMU's side of the protocol is covered by `qmp_qemu.rs`.

#[path = "support/fake.rs"]
mod fake;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::backend::{Backend, BackendError, LaunchInput};
use dstack_host_vmm::manager::qmp;
use dstack_host_vmm::manager::supervisor::ProcSpec;
use dstack_rpc::Client;
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient};

const FAKE_QEMU: &str = r#"
import json, os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(1)
print("qmp listening", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb", buffering=0)
    f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    for line in f:
        cmd = json.loads(line)["execute"]
        f.write(b'{"return": {}}\n')
        if cmd == "system_powerdown":
            print("guest: power button pressed, powering off", flush=True)
            sys.exit(0)
"#;

/// Named `tcg` so the manager uses QMP; runs the fake QEMU.
struct FakeTcg;

impl Backend for FakeTcg {
    fn name(&self) -> &'static str {
        "tcg"
    }
    fn is_emulation(&self) -> bool {
        true
    }
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError> {
        fake::FakeBackend.prepare(input)
    }
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError> {
        let wd = input.workdir;
        let sock = qmp::socket_path(wd);
        let _ = std::fs::remove_file(&sock);
        Ok(vec![ProcSpec {
            name: "vm".into(),
            program: "python3".into(),
            args: vec!["-c".into(), FAKE_QEMU.into(), sock.display().to_string()],
            cwd: wd.path().to_owned(),
            stdout: wd.stdout_log(),
            stderr: wd.stderr_log(),
            ready_path: Some(sock),
        }])
    }
}

fn python_or_skip() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
            Ok("1"),
            "python3 not found and DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!("\n*** SKIP shutdown_tcg: python3 not found ***\n");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_vm_presses_the_power_button_and_waits() {
    if !python_or_skip() {
        return;
    }
    let s = fake::Served::start_with(Box::new(FakeTcg)).await;
    let c = VmmClient::new(Client::unix(&s.sock, "/prpc"));
    let id = c
        .create_vm(VmConfiguration {
            name: "tcg-vm".into(),
            image: "test-img".into(),
            compose_file:
                r#"{"manifest_version":2,"name":"x","runner":"docker-compose","docker_compose_file":"services: {}\n"}"#
                    .into(),
            vcpu: 1,
            memory: 256,
            disk_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let t = Instant::now();
    c.shutdown_vm(Id { id: id.clone() }).await.unwrap();
    let took = t.elapsed();
    let info = c.get_info(Id { id: id.clone() }).await.unwrap().info.unwrap();
    assert_eq!(info.status, "stopped");
    let log = std::fs::read_to_string(s.run_dir(&id).join("stdout.log")).unwrap();
    assert!(log.contains("power button pressed"), "{log}");
    // The process left on its own (well inside the 30 s grace), not through the SIGTERM/SIGKILL fallback.
    assert!(took < Duration::from_secs(10), "{took:?}");
}
