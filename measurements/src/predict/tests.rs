use super::*;
use crate::eventlog::{parse_json_log, replay};

fn kernel() -> Vec<u8> {
    // The hand-built PE's first section starts at 0x200, so the setup header lives in hashed data.
    let mut k = crate::authenticode::tests::minimal_pe(false);
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x211] = 0x01; // LOADED_HIGH
    k[0x236..0x238].copy_from_slice(&0x0040u16.to_le_bytes()); // XLF_CAN_BE_LOADED_ABOVE_4G
    k
}

fn firmware() -> Vec<u8> {
    crate::mrtd::tests::fw_with_guid_table()
}

const SHAPE: VmShape = VmShape {
    vcpus: 2,
    memory_bytes: 4 << 30,
};

fn predict_synthetic(shape: &VmShape) -> Prediction {
    let (fw, k) = (firmware(), kernel());
    predict(
        &BootInputs {
            firmware: &fw,
            kernel: &k,
            initrd: b"initrd-bytes",
            cmdline: "console=ttyS0",
        },
        shape,
    )
    .unwrap()
}

#[test]
fn replay_of_the_predicted_log_equals_the_registers() {
    let p = predict_synthetic(&SHAPE);
    let r = replay(&p.events).unwrap();
    assert_eq!([r[0], r[1], r[2]], p.rtmr);
    assert_eq!(r[3], [0; 48]);
    assert_eq!(p.events.iter().filter(|e| e.imr == 0).count(), 13);
    // The log survives the JSON form the simulated module is initialised with.
    let json = serde_json::to_vec(&p.events).unwrap();
    assert_eq!(parse_json_log(&json).unwrap(), p.events);
    assert_eq!(
        p.mrtd,
        crate::mrtd::compute_mrtd(&firmware(), PageOrder::SinglePass).unwrap()
    );
}

#[test]
fn registers_depend_on_exactly_their_inputs() {
    let a = predict_synthetic(&SHAPE);
    let more_cpus = predict_synthetic(&VmShape { vcpus: 4, ..SHAPE });
    assert_eq!(a.mrtd, more_cpus.mrtd);
    assert_ne!(a.rtmr[0], more_cpus.rtmr[0]); // MADT
    assert_eq!(a.rtmr[1..], more_cpus.rtmr[1..]);
    let less_mem = predict_synthetic(&VmShape {
        memory_bytes: 2 << 30,
        ..SHAPE
    });
    assert_ne!(a.rtmr[0], less_mem.rtmr[0]); // HOB + PCI window
    assert_ne!(a.rtmr[1], less_mem.rtmr[1]); // initrd placement in the patched header
    assert_eq!(a.rtmr[2], less_mem.rtmr[2]);
    let (fw, k) = (firmware(), kernel());
    let other_cmdline = predict(
        &BootInputs {
            firmware: &fw,
            kernel: &k,
            initrd: b"initrd-bytes",
            cmdline: "console=hvc0",
        },
        &SHAPE,
    )
    .unwrap();
    assert_eq!(a.rtmr[..2], other_cmdline.rtmr[..2]);
    assert_ne!(a.rtmr[2], other_cmdline.rtmr[2]);
}

#[test]
fn bad_inputs_are_errors() {
    let (fw, k) = (firmware(), kernel());
    let inputs = BootInputs {
        firmware: &fw,
        kernel: &k,
        initrd: b"",
        cmdline: "",
    };
    for mem in [0, (2 << 30) + 1, 2 << 40] {
        let shape = VmShape {
            vcpus: 1,
            memory_bytes: mem,
        };
        assert!(matches!(predict(&inputs, &shape), Err(PredictError::BadMemory(_))));
    }
    let shape = VmShape {
        vcpus: 0,
        memory_bytes: 1 << 30,
    };
    assert!(matches!(predict(&inputs, &shape), Err(PredictError::Acpi(_))));
    let bad_kernel = BootInputs {
        kernel: &k[..0x100],
        ..inputs
    };
    assert!(matches!(predict(&bad_kernel, &SHAPE), Err(PredictError::Loader(_))));
    let bad_fw = BootInputs {
        firmware: &fw[..0x1000],
        ..inputs
    };
    assert!(matches!(predict(&bad_fw, &SHAPE), Err(PredictError::Firmware(_))));
}

/// Independent replay with Python's hashlib (python3 from PATH; skipped loudly when absent).
#[test]
fn python_hashlib_replay_agrees() {
    let p = predict_synthetic(&SHAPE);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.json");
    std::fs::write(&log, serde_json::to_vec(&p.events).unwrap()).unwrap();
    let script = r#"
import hashlib, json, sys
r = [bytes(48)] * 3
for e in json.load(open(sys.argv[1])):
    r[e["imr"]] = hashlib.sha384(r[e["imr"]] + bytes.fromhex(e["digest"])).digest()
# RTMR2's digests recomputed from scratch: UTF-16LE command line + NUL, then the initrd.
c = hashlib.sha384("console=ttyS0 initrd=initrd".encode("utf-16-le") + b"\0\0").digest()
i = hashlib.sha384(b"initrd-bytes").digest()
r2 = hashlib.sha384(hashlib.sha384(bytes(48) + c).digest() + i).digest()
print(" ".join(x.hex() for x in r + [r2]))
"#;
    let out = match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&log)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        other => {
            eprintln!("SKIPPED python_hashlib_replay_agrees: python3 unavailable: {other:?}");
            return;
        }
    };
    let got: Vec<&str> = out.split_whitespace().collect();
    let want: Vec<String> = p.rtmr.iter().map(hex::encode).collect();
    assert_eq!(got[..3], want[..]);
    assert_eq!(got[3], want[2]);
}

/// The fixed events and payload layouts against a real dstack TD's log (QEMU + OVMF, tests/data README).
#[test]
fn events_match_a_real_dstack_td_log() {
    let report: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/dstack-quote-report.json")).unwrap();
    let log = crate::eventlog::events_from_value(report["event_log"].clone()).unwrap();
    let real: Vec<_> = log.iter().filter(|e| e.imr < 3).collect();
    let ours = predict_synthetic(&SHAPE).events;
    assert_eq!(real.len(), ours.len());
    for (i, (r, o)) in real.iter().zip(&ours).enumerate() {
        assert_eq!((r.imr, r.event_type), (o.imr, o.event_type), "event #{i}");
    }
    // Digests and payloads fully determined by OVMF constants: variables, separators, boot options,
    // EFI actions.
    for i in [2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 18, 19] {
        assert_eq!(real[i].digest, ours[i].digest, "digest of event #{i}");
        assert_eq!(real[i].event_payload, ours[i].event_payload, "payload of event #{i}");
    }
    // Payload layouts of the input-dependent events.
    assert_eq!(real[0].event_payload, events::td_hob(&[], 0x80_9000).event_payload);
    assert_eq!(
        real[1].event_payload,
        events::cfv(&vec![0; 0x8_4000], 0xffc0_0000).event_payload
    );
    for i in [8, 9, 10, 16, 17] {
        assert_eq!(real[i].event_payload, ours[i].event_payload, "payload of event #{i}");
    }
    // The kernel's image-load event: same device path; load address and size are runtime values.
    assert_eq!(real[11].event_payload[24..], ours[11].event_payload[24..]);
}
