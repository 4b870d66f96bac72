//! `dstack-oci build` is reproducible and produces a layout that independent tools agree with:
//! coreutils `sha256sum` for every digest, `gzip -t`/`gzip -dc` for the layer and its diff_id, and
//! GNU tar for the layer's entries, owners, modes and mtimes.

mod common;

use std::fs;
use std::path::Path;

use common::{cli, sha256sum, some_elf, tool};

fn build(out: &Path, env: &[(&str, &str)]) -> String {
    let out = out.to_str().unwrap();
    cli(
        &[
            "build",
            "--binary",
            some_elf(),
            "--name",
            "demo:v1",
            "--out",
            out,
            "--env",
            "GREETING=hi",
        ],
        env,
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob(dir: &Path, digest: &str) -> std::path::PathBuf {
    dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

/// Every file under `dir`, relative path → contents.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn building_twice_gives_identical_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let da = build(&a, &[]);
    let db = build(&b, &[]);
    assert!(da.starts_with("sha256:") && da.len() == 71, "{da}");
    assert_eq!(da, db);
    assert_eq!(tree(&a), tree(&b));
    // Another epoch changes the digest; the same epoch twice does not.
    let c = build(&tmp.path().join("c"), &[("SOURCE_DATE_EPOCH", "1700000000")]);
    let d = build(&tmp.path().join("d"), &[("SOURCE_DATE_EPOCH", "1700000000")]);
    assert_ne!(c, da);
    assert_eq!(c, d);
}

#[test]
fn layout_agrees_with_independent_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let digest = build(&dir, &[]);
    assert_eq!(json(&dir.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json(&dir.join("index.json"));
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );

    // Every blob hashes (per sha256sum) to its file name.
    for entry in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(
            sha256sum(&p),
            format!("sha256:{}", p.file_name().unwrap().to_str().unwrap())
        );
    }

    let manifest = json(&blob(&dir, &digest));
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let layer_desc = &manifest["layers"][0];
    assert_eq!(layer_desc["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let layer = blob(&dir, layer_desc["digest"].as_str().unwrap());
    assert_eq!(
        fs::metadata(&layer).unwrap().len(),
        layer_desc["size"].as_u64().unwrap()
    );

    let config = json(&blob(&dir, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/app"]));
    assert_eq!(config["config"]["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&"GREETING=hi".into())
    );
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");

    // The layer is valid gzip, and its uncompressed sha256 is the config's diff_id.
    let layer_s = layer.to_str().unwrap();
    tool("gzip", &["-t", layer_s]);
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, tool("gzip", &["-dc", layer_s]).stdout).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([sha256sum(&tar_path)]));

    // GNU tar sees exactly our entries, owned by 0/0, with the fixed mtime.
    let listing = String::from_utf8(
        tool(
            "tar",
            &["--numeric-owner", "--full-time", "-tvf", tar_path.to_str().unwrap()],
        )
        .stdout,
    )
    .unwrap();
    let rows: Vec<Vec<&str>> = listing.lines().map(|l| l.split_whitespace().collect()).collect();
    let summary: Vec<(&str, &str, &str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[3], r[4], r[5])).collect();
    assert_eq!(
        summary,
        vec![
            ("-rwxr-xr-x", "0/0", "1970-01-01", "00:00:00", "app"),
            ("drwxr-xr-x", "0/0", "1970-01-01", "00:00:00", "etc/"),
            ("-rw-r--r--", "0/0", "1970-01-01", "00:00:00", "etc/group"),
            ("-rw-r--r--", "0/0", "1970-01-01", "00:00:00", "etc/passwd"),
            ("drwxrwxrwt", "0/0", "1970-01-01", "00:00:00", "tmp/"),
        ]
    );
    // The packaged binary is byte-identical to the input.
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    tool(
        "tar",
        &["-xf", tar_path.to_str().unwrap(), "-C", root.to_str().unwrap()],
    );
    assert_eq!(fs::read(root.join("app")).unwrap(), fs::read(some_elf()).unwrap());
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
}

#[test]
fn docker_media_types_option() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let args = [
        "build",
        "--binary",
        some_elf(),
        "--name",
        "demo",
        "--out",
        dir.to_str().unwrap(),
    ];
    let digest = cli(
        &[&args[..], &["--docker-media-types", "--port", "80", "--port", "443"]].concat(),
        &[],
    );
    let manifest = json(&blob(&dir, &digest));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let config = json(&blob(&dir, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"443/tcp": {}, "80/tcp": {}})
    );
    let index = json(&dir.join("index.json"));
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "demo:latest"
    );
}

#[test]
fn build_refuses_non_elf() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("script.sh");
    fs::write(&file, "#!/bin/sh\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dstack-oci"))
        .args(["build", "--binary", file.to_str().unwrap(), "--name", "x:y", "--out"])
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an ELF executable"));
}
