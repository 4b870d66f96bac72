//! kill -9 of a CVM during disk writes (issue 13, fault injection): no write acknowledged to the app is lost.
//!
//! The demo app appends checksummed records to a file on a named docker volume (on the CVM's LUKS2 + ext4
//! data disk) and answers `POST /records/<seq>` only after fsync. Several writers post records continuously;
//! the CVM's QEMU process (found through the VM manager's state, checked against its work directory) gets
//! SIGKILL while requests are in flight. The VM is then started again through the manager API and the log is
//! read back: every acknowledged record must be there with a valid checksum and the right payload;
//! unacknowledged in-flight ones may be present or absent; nothing but a torn last record may be damaged.
//! guest-init must have reopened the same LUKS volume (no format), and the app keeps appending after it.
//!
//! Inputs: see the `dstack_e2e` crate docs (`cargo xtask test` provides them); `DSTACK_DEMO_APP_BIN` must be
//! a demo app with the `/records` endpoints. Missing inputs: loud SKIP, or failure under
//! `DSTACK_REQUIRE_FIXTURES=1`. Two CVM boots under TCG: about 2 minutes here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack_e2e::stack::{APP_PORT, AppSpec, free_port, http_get, tail};
use dstack_e2e::{Inputs, KmsOptions, Stack};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Concurrent writers during the kill.
const WRITERS: usize = 4;
/// Records acknowledged before the writers start (the "old data" that must survive untouched).
const BEFORE: u64 = 8;
/// How long the writers run before the kill: longer than ext4's 5 s commit interval, so periodic journal
/// commits mix with the fsyncs.
const WRITE_TIME: Duration = Duration::from_secs(7);

/// The payload of record `seq`: derived from `seq` alone, 200 to ~3.2 KB so lines cross 4 KiB blocks.
fn payload(seq: u64) -> Vec<u8> {
    let len = 200 + (seq * 997 % 3000) as usize;
    format!("record {seq} / ").bytes().cycle().take(len).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `POST /records/<seq>` with the payload; Ok only for an HTTP 200 naming the same seq (an acknowledgement).
fn post_record(port: u16, seq: u64) -> Result<u64, String> {
    let body = payload(seq);
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /records/{seq} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .and_then(|()| s.write_all(&body))
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, reply) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("{head}: {reply}"));
    }
    let v: serde_json::Value = serde_json::from_str(reply).map_err(|e| format!("{e}: {reply}"))?;
    if v["seq"].as_u64() != Some(seq) {
        return Err(format!("acknowledged the wrong record: {reply}"));
    }
    v["offset"].as_u64().ok_or_else(|| format!("no offset: {reply}"))
}

/// What the writers tried and what the app acknowledged (seq → offset).
#[derive(Default)]
struct Ledger {
    attempted: BTreeSet<u64>,
    acked: BTreeMap<u64, u64>,
    /// Why each writer stopped.
    stops: Vec<String>,
}

/// `GET /records`, parsed.
fn read_records(port: u16) -> serde_json::Value {
    let (status, body) = http_get(port, "/records").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The CVM's QEMU pid from the VM manager's state, checked against the process table: the process must be
/// QEMU and its command line must name this VM's work directory.
fn qemu_pid(stack: &Stack, id: &str, work_dir: &Path) -> i32 {
    let snap = stack
        .mgr
        .snapshots()
        .into_iter()
        .find(|s| s.manifest.id == id)
        .expect("the VM is in the manager's state");
    let vm = snap
        .state
        .processes
        .iter()
        .find(|p| p.name == "vm")
        .unwrap_or_else(|| panic!("no VM process recorded: {:?}", snap.state.processes));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).expect("the VM process is alive");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", vm.pid)).unwrap_or_default();
    assert!(comm.starts_with("qemu"), "pid {} is {comm:?}, not QEMU", vm.pid);
    assert!(
        cmdline.contains(&work_dir.display().to_string()),
        "pid {} does not belong to {}: {cmdline}",
        vm.pid,
        work_dir.display()
    );
    i32::try_from(vm.pid).expect("pid fits i32")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_cvm() {
    let Some(inputs) = Inputs::for_test("cvm_kill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path(), inputs, KmsOptions::default()).await.unwrap();
    let port = free_port().unwrap();
    let mut app = AppSpec::demo(&stack.app_image, "", port);
    app.name = "cvm-kill".into();
    app.env.clear();
    app.vcpus = 1;
    app.compose = format!(
        "services:\n  web:\n    image: {image}\n    ports: [\"{APP_PORT}:{APP_PORT}\"]\n    volumes:\n      \
         - /var/run/dstack.sock:/var/run/dstack.sock\n      - records:/records\n    environment:\n      \
         RECORDS_DIR: /records/log\nvolumes:\n  records: {{}}\n",
        image = stack.app_image
    );
    let id = stack.deploy(&app).await.unwrap();
    let work_dir = dir.path().join("run/vm").join(&id);

    let t = Instant::now();
    stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("[{:>6.1}s] boot: {p}", t.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    let first_boot = t.elapsed();
    eprintln!("app answered after {first_boot:?}");
    let log = stack.serial_log(&id);
    assert!(
        log.contains("LUKS2 formatted"),
        "first boot formats: {}",
        tail(&log, 40)
    );

    // Old data: acknowledged one at a time, and visible before the crash.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for seq in 0..BEFORE {
        let offset = post_record(port, seq)
            .unwrap_or_else(|e| panic!("record {seq}: {e} (is DSTACK_DEMO_APP_BIN a demo app with /records?)"));
        let mut l = ledger.lock().unwrap();
        l.attempted.insert(seq);
        l.acked.insert(seq, offset);
    }
    let before = read_records(port);
    assert_eq!(before["records"].as_array().unwrap().len() as u64, BEFORE, "{before}");

    // Concurrent writers, each with one request in flight at all times, until one of them fails.
    let next = Arc::new(AtomicU64::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (ledger, next, stop) = (ledger.clone(), next.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let seq = next.fetch_add(1, Ordering::SeqCst);
                    ledger.lock().unwrap().attempted.insert(seq);
                    match post_record(port, seq) {
                        Ok(offset) => {
                            ledger.lock().unwrap().acked.insert(seq, offset);
                        }
                        Err(e) => {
                            ledger
                                .lock()
                                .unwrap()
                                .stops
                                .push(format!("writer {w} at seq {seq}: {e}"));
                            return;
                        }
                    }
                }
                ledger.lock().unwrap().stops.push(format!("writer {w}: stopped"));
            })
        })
        .collect();
    let t_write = Instant::now();
    tokio::time::sleep(WRITE_TIME).await;
    let acked_at_kill = ledger.lock().unwrap().acked.len() - BEFORE as usize;
    assert!(
        acked_at_kill > 0,
        "no concurrent write was acknowledged within {WRITE_TIME:?}"
    );
    let write_time = t_write.elapsed();

    // SIGKILL the CVM's QEMU while the writers wait for their answers.
    let pid = qemu_pid(&stack, &id, &work_dir);
    // SAFETY: kill(2) on a pid the VM manager recorded for this VM and that we just checked is its QEMU.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
    eprintln!(
        "killed QEMU pid {pid} after {write_time:?} of writing ({acked_at_kill} concurrent records acknowledged, \
         {:.1}/s)",
        acked_at_kill as f64 / write_time.as_secs_f64()
    );
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let (attempted, acked, stops) = {
        let l = ledger.lock().unwrap();
        (l.attempted.clone(), l.acked.clone(), l.stops.clone())
    };
    let in_flight: BTreeSet<u64> = attempted.iter().filter(|s| !acked.contains_key(s)).copied().collect();
    eprintln!(
        "{} attempted, {} acknowledged, in flight at the kill: {in_flight:?}\n{}",
        attempted.len(),
        acked.len(),
        stops.join("\n")
    );
    assert!(!in_flight.is_empty(), "the kill must hit requests in flight: {stops:?}");

    // The manager sees the exit and restarts the VM itself (auto-restart); if it has given up instead, start it
    // through the API. Either way the new boot gets a fresh simulated TDX module: a VM relaunched with the crashed
    // run's registers would carry that boot's RTMR3 events and the KMS would refuse its keys.
    let t_exit = Instant::now();
    let status = loop {
        let info = stack.info(&id).await.unwrap();
        if info.status == "restarting" || info.status == "exited" {
            break info.status;
        }
        assert!(
            t_exit.elapsed() < Duration::from_secs(30),
            "the manager did not notice the kill: {}",
            info.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let crashed_log = stack.serial_log(&id);
    std::fs::write(work_dir.join("serial.log"), b"").unwrap();
    let t_restart = Instant::now();
    eprintln!("after the kill the manager reports {status:?}");
    if status == "exited" {
        stack.start_vm(&id).await.unwrap();
    }
    stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("[{:>6.1}s] reboot: {p}", t_restart.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    let reboot = t_restart.elapsed();
    eprintln!("app answered {reboot:?} after the restart");

    // The same LUKS volume was opened, not formatted again.
    let log = stack.serial_log(&id);
    assert!(log.contains("existing LUKS volume"), "{}", tail(&log, 60));
    for fresh in ["formatting", "LUKS2 formatted", "ext4 created"] {
        assert!(
            !log.contains(fresh),
            "the data disk must not be recreated ({fresh:?}):\n{}",
            tail(&log, 60)
        );
    }
    let fs_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("EXT4-fs") || l.contains("e2fsck") || l.contains("journal") || l.contains("mounted on"))
        .collect();
    eprintln!("file system lines of the reboot:\n{}", fs_lines.join("\n"));
    // The file system was mounted when QEMU died, so its journal needs replaying: guest-init's `e2fsck -p`
    // does that before mounting and logs it (the kernel then mounts a clean file system).
    assert!(
        log.contains("recovering journal"),
        "no ext4 journal recovery in the reboot log:\n{}",
        fs_lines.join("\n")
    );

    // Every acknowledged record is there, whole and at the offset it was acknowledged at.
    let found = read_records(port);
    eprintln!(
        "after the restart: file_len {}, {} records, torn tail {}, corrupt {}",
        found["file_len"],
        found["records"].as_array().map_or(0, Vec::len),
        found["torn_tail"],
        found["corrupt"]
    );
    assert_eq!(
        found["corrupt"].as_array().map(Vec::len),
        Some(0),
        "corruption besides a torn tail: {}",
        found["corrupt"]
    );
    let mut present = BTreeMap::new();
    for r in found["records"].as_array().unwrap() {
        let seq = r["seq"].as_u64().unwrap();
        let expected = payload(seq);
        assert_eq!(
            r["payload_len"].as_u64(),
            Some(expected.len() as u64),
            "record {seq}: {r}"
        );
        assert_eq!(
            r["payload_sha256"].as_str(),
            Some(sha256_hex(&expected).as_str()),
            "record {seq}: {r}"
        );
        assert!(attempted.contains(&seq), "record {seq} was never written: {r}");
        let offset = r["offset"].as_u64().unwrap();
        assert!(present.insert(seq, offset).is_none(), "record {seq} appears twice");
    }
    let lost: Vec<u64> = acked.keys().filter(|s| !present.contains_key(s)).copied().collect();
    assert!(lost.is_empty(), "acknowledged records lost: {lost:?}");
    for (seq, offset) in &acked {
        assert_eq!(present.get(seq), Some(offset), "record {seq} moved");
    }
    let kept_unacked: Vec<u64> = in_flight.iter().filter(|s| present.contains_key(s)).copied().collect();
    eprintln!(
        "all {} acknowledged records present; of {} in flight, {kept_unacked:?} made it to disk",
        acked.len(),
        in_flight.len()
    );
    if let Some(torn) = found["torn_tail"].as_object() {
        // Only the end of the file may be torn: it starts after every whole record.
        let start = torn["offset"].as_u64().unwrap();
        assert!(
            present.values().all(|&o| o < start),
            "torn tail at {start} before a record"
        );
    }

    // The app keeps working on the recovered volume: a new record lands after the old ones, tail cut off.
    let after = next.load(Ordering::SeqCst) + 1;
    post_record(port, after).unwrap();
    let again = read_records(port);
    assert!(again["torn_tail"].is_null(), "{}", again["torn_tail"]);
    assert_eq!(
        again["corrupt"].as_array().map(Vec::len),
        Some(0),
        "{}",
        again["corrupt"]
    );
    assert_eq!(
        again["records"].as_array().map(Vec::len),
        Some(present.len() + 1),
        "{again}"
    );
    eprintln!(
        "timings: first boot {first_boot:?}, writing {write_time:?}, restart to app {reboot:?}; crashed run's \
         serial log had {} lines",
        crashed_log.lines().count()
    );
}
