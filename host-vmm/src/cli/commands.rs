//! The subcommands. Output is for people (tables, progress lines); `--json` where scripts need it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dstack_keys::{EnvVar, encrypt_env};
use dstack_rpc::vmm::{Id, ResizeVmRequest, StatusRequest, UpdateVmRequest, VmConfiguration, VmInfo};

use super::compose::{self, AppComposeDoc, ComposeOptions};
use super::kms::{self, SignatureKind};
use super::{CliError, Command, Conn, DeployArgs, KmsArgs, UpgradeArgs, WaitArgs, read_text};

/// Boot progress values that mean the app is up (ours: guest-init's last step; dstack's `done`).
const BOOT_DONE: &[&str] = &["app started", "done"];
/// How often boot progress and followed logs are polled.
const POLL: Duration = Duration::from_millis(500);

pub async fn run(conn: &Conn, cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Deploy(a) => deploy(conn, a).await,
        Command::List { json } => list(conn, json).await,
        Command::Info { id, json } => info(conn, &id, json).await,
        Command::Logs {
            id,
            follow,
            lines,
            source,
        } => logs(conn, &id, follow, lines, &source).await,
        Command::Stop { id, force } => stop(conn, &id, force).await,
        Command::Start { id, wait } => {
            let id = resolve(conn, &id).await?;
            conn.vmm
                .start_vm(Id { id: id.clone() })
                .await
                .map_err(|e| conn.err(e))?;
            println!("Started VM {id}");
            follow_boot(conn, &id, &wait).await
        }
        Command::Remove { id } => {
            let id = resolve(conn, &id).await?;
            conn.vmm
                .remove_vm(Id { id: id.clone() })
                .await
                .map_err(|e| conn.err(e))?;
            println!("Removed VM {id}");
            Ok(())
        }
        Command::Upgrade(a) => upgrade(conn, a).await,
        Command::Resize {
            id,
            vcpu,
            memory,
            disk,
            image,
        } => {
            if vcpu.is_none() && memory.is_none() && disk.is_none() && image.is_none() {
                return Err(CliError::Input(
                    "resize needs at least one of --vcpu, --memory, --disk, --image".into(),
                ));
            }
            let id = resolve(conn, &id).await?;
            conn.vmm
                .resize_vm(ResizeVmRequest {
                    id: id.clone(),
                    vcpu,
                    memory,
                    disk_size: disk,
                    image,
                })
                .await
                .map_err(|e| conn.err(e))?;
            println!("Resized VM {id}");
            Ok(())
        }
    }
}

/// Accepts a VM id, or a name that matches exactly one VM.
async fn resolve(conn: &Conn, id_or_name: &str) -> Result<String, CliError> {
    let st = conn
        .vmm
        .status(StatusRequest {
            brief: true,
            ..Default::default()
        })
        .await
        .map_err(|e| conn.err(e))?;
    if st.vms.iter().any(|v| v.id == id_or_name) {
        return Ok(id_or_name.to_owned());
    }
    let named: Vec<&VmInfo> = st.vms.iter().filter(|v| v.name == id_or_name).collect();
    match named.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(CliError::Input(format!("no VM with id or name {id_or_name:?}"))),
        many => Err(CliError::Input(format!(
            "{} VMs are named {id_or_name:?}; use an id: {}",
            many.len(),
            many.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

async fn get_info(conn: &Conn, id: &str) -> Result<VmInfo, CliError> {
    let r = conn
        .vmm
        .get_info(Id { id: id.to_owned() })
        .await
        .map_err(|e| conn.err(e))?;
    match r.info {
        Some(i) if r.found => Ok(i),
        _ => Err(CliError::Input(format!("VM {id} not found"))),
    }
}

/// KMS URLs from the command line, else the manager's defaults.
async fn kms_urls(conn: &Conn, args: &KmsArgs) -> Result<Vec<String>, CliError> {
    if !args.kms_urls.is_empty() {
        return Ok(args.kms_urls.clone());
    }
    let meta = conn.vmm.get_meta().await.map_err(|e| conn.err(e))?;
    Ok(meta.kms.map(|k| k.urls).unwrap_or_default())
}

/// Encrypts `vars` for `app_id` with the key from the first KMS URL.
async fn encrypt_for_app(vars: &[EnvVar], app_id: &str, urls: &[String], args: &KmsArgs) -> Result<Vec<u8>, CliError> {
    let url = urls.first().ok_or_else(|| {
        CliError::Input("--env-file needs a KMS: pass --kms-url (the manager has none configured)".into())
    })?;
    let (key, signer) = kms::fetch_env_pubkey(url, app_id, &args.kms_signers).await?;
    let kind = match signer.kind {
        SignatureKind::V1 { timestamp } => format!("signature_v1, timestamp {timestamp}"),
        SignatureKind::Legacy => "legacy signature without timestamp".into(),
    };
    if args.kms_signers.is_empty() {
        eprintln!(
            "WARNING: env key signed by KMS key {} ({kind}), which is not pinned; pass --kms-signer {} to require it",
            signer.public_key, signer.public_key
        );
    } else {
        println!("Env key signed by trusted KMS key {} ({kind})", signer.public_key);
    }
    Ok(encrypt_env(&key, vars)?)
}

fn read_env(args: &KmsArgs) -> Result<Vec<EnvVar>, CliError> {
    match &args.env_file {
        Some(p) => compose::parse_env_file(&read_text(p)?),
        None => Ok(Vec::new()),
    }
}

async fn deploy(conn: &Conn, a: DeployArgs) -> Result<(), CliError> {
    let docker_compose = read_text(&a.compose)?;
    let vars = read_env(&a.keys)?;
    let ports = a
        .ports
        .iter()
        .map(|p| compose::parse_port(p))
        .collect::<Result<Vec<_>, _>>()?;
    let urls = kms_urls(conn, &a.keys).await?;
    let kms_enabled = !a.no_kms && (a.kms_enabled || !urls.is_empty());
    if !vars.is_empty() && !kms_enabled {
        return Err(CliError::Input(
            "--env-file needs the KMS to decrypt it in the guest: add --kms (and --kms-url)".into(),
        ));
    }
    let doc = AppComposeDoc::new(&ComposeOptions {
        name: a.name.clone(),
        docker_compose,
        kms: kms_enabled,
        gateway: a.gateway,
        public_logs: a.public_logs,
        public_sysinfo: a.public_sysinfo,
        allowed_envs: vars.iter().map(|v| v.key.clone()).collect(),
        no_instance_id: a.no_instance_id,
        secure_time: a.secure_time,
        ..Default::default()
    });
    let app_compose = doc.to_json()?;
    if let Some(out) = &a.output_compose {
        std::fs::write(out, &app_compose).map_err(|source| CliError::File {
            path: out.display().to_string(),
            source,
        })?;
    }
    let app_id = match &a.app_id {
        Some(id) => id.trim_start_matches("0x").to_lowercase(),
        None => compose::default_app_id(&app_compose),
    };
    println!("Compose hash: {}", compose::compose_hash(&app_compose));
    println!("App ID: {app_id}");
    let encrypted_env = if vars.is_empty() {
        Vec::new()
    } else {
        let blob = encrypt_for_app(&vars, &app_id, &urls, &a.keys).await?;
        println!("Encrypted {} environment variable(s)", vars.len());
        blob
    };
    let req = VmConfiguration {
        name: a.name,
        image: a.image,
        compose_file: app_compose,
        vcpu: a.vcpu,
        memory: a.memory,
        disk_size: a.disk,
        ports,
        encrypted_env,
        app_id: a.app_id.map(|_| app_id.clone()),
        kms_urls: a.keys.kms_urls,
        gateway_urls: a.gateway_urls,
        stopped: a.stopped,
        ..Default::default()
    };
    let id = conn.vmm.create_vm(req).await.map_err(|e| conn.err(e))?.id;
    println!("Created VM {id}");
    if a.stopped {
        return Ok(());
    }
    follow_boot(conn, &id, &a.wait).await
}

/// Prints status changes and guest events until the app is up, boot fails, the VM stops or time runs out.
async fn follow_boot(conn: &Conn, id: &str, wait: &WaitArgs) -> Result<(), CliError> {
    if wait.detach {
        println!("Follow its boot with: dstack-vmm-cli info {id}");
        return Ok(());
    }
    let start = Instant::now();
    let timeout = Duration::from_secs(wait.timeout);
    let mut last_status = String::new();
    let mut seen = HashSet::new();
    loop {
        let vm = get_info(conn, id).await?;
        let t = start.elapsed().as_secs_f64();
        if vm.status != last_status {
            println!("[{t:6.1}s] status: {}", vm.status);
            last_status = vm.status.clone();
        }
        for e in &vm.events {
            if seen.insert((e.timestamp, e.event.clone(), e.body.clone())) {
                println!("[{t:6.1}s] {}: {}", e.event, e.body);
            }
        }
        if !vm.boot_error.is_empty() {
            return Err(CliError::Failed(format!("VM {id}: boot failed: {}", vm.boot_error)));
        }
        if BOOT_DONE.contains(&vm.boot_progress.as_str()) {
            println!("VM {id} is up ({:.1}s)", start.elapsed().as_secs_f64());
            return Ok(());
        }
        if matches!(vm.status.as_str(), "stopped" | "exited") {
            return Err(CliError::Failed(format!(
                "VM {id} is {} before finishing boot (last progress: {:?}); see: dstack-vmm-cli logs {id}",
                vm.status, vm.boot_progress
            )));
        }
        if start.elapsed() >= timeout {
            return Err(CliError::Failed(format!(
                "VM {id}: no boot completion within {}s (last progress: {:?}); it keeps running",
                wait.timeout, vm.boot_progress
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn list(conn: &Conn, json: bool) -> Result<(), CliError> {
    let st = conn
        .vmm
        .status(StatusRequest::default())
        .await
        .map_err(|e| conn.err(e))?;
    if json {
        let text = serde_json::to_string_pretty(&st).map_err(|e| CliError::Failed(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    if st.vms.is_empty() {
        println!("No VMs");
        return Ok(());
    }
    let mut rows = vec![
        [
            "ID", "NAME", "STATUS", "VCPU", "MEMORY", "DISK", "PORTS", "UPTIME", "PROGRESS",
        ]
        .map(String::from),
    ];
    for vm in &st.vms {
        let c = vm.configuration.clone().unwrap_or_default();
        let progress = if vm.boot_error.is_empty() {
            vm.boot_progress.clone()
        } else {
            format!("error: {}", vm.boot_error)
        };
        rows.push([
            vm.id.clone(),
            vm.name.clone(),
            vm.status.clone(),
            c.vcpu.to_string(),
            format!("{}M", c.memory),
            format!("{}G", c.disk_size),
            ports_text(&c),
            vm.uptime.clone(),
            progress,
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

fn ports_text(c: &VmConfiguration) -> String {
    c.ports
        .iter()
        .map(|p| format!("{}:{}:{}->{}", p.protocol, p.host_address, p.host_port, p.vm_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn info(conn: &Conn, id: &str, json: bool) -> Result<(), CliError> {
    let id = resolve(conn, id).await?;
    let vm = get_info(conn, &id).await?;
    if json {
        let text = serde_json::to_string_pretty(&vm).map_err(|e| CliError::Failed(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let c = vm.configuration.clone().unwrap_or_default();
    let mut lines = vec![
        ("ID", vm.id.clone()),
        ("Name", vm.name.clone()),
        ("Status", vm.status.clone()),
        ("Uptime", vm.uptime.clone()),
        ("App ID", vm.app_id.clone()),
        ("Instance ID", vm.instance_id.clone().unwrap_or_default()),
        ("Image", format!("{} {}", c.image, vm.image_version)),
        ("vCPU", c.vcpu.to_string()),
        ("Memory", format!("{} MB", c.memory)),
        ("Disk", format!("{} GB", c.disk_size)),
        ("Ports", ports_text(&c)),
        ("Compose hash", compose::compose_hash(&c.compose_file)),
        ("Boot progress", vm.boot_progress.clone()),
        ("Boot error", vm.boot_error.clone()),
        ("Shutdown progress", vm.shutdown_progress.clone()),
        ("Exited at", vm.exited_at.clone().unwrap_or_default()),
    ];
    lines.retain(|(_, v)| !v.trim().is_empty());
    for (k, v) in lines {
        println!("{k:<18} {v}");
    }
    if !vm.events.is_empty() {
        println!("Events:");
        for e in &vm.events {
            println!("  {} {}: {}", e.timestamp, e.event, e.body);
        }
    }
    Ok(())
}

async fn fetch_log(conn: &Conn, query: &str) -> Result<Option<(Vec<u8>, Option<u64>)>, CliError> {
    let r = conn
        .http
        .send(http::Method::GET, &format!("/logs?{query}"), None, bytes::Bytes::new())
        .await
        .map_err(|e| conn.err(e))?;
    if r.status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !r.status.is_success() {
        return Err(conn.err(format!(
            "logs: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        )));
    }
    let offset = r
        .headers
        .get("x-log-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok(Some((r.body.to_vec(), offset)))
}

async fn logs(conn: &Conn, id: &str, follow: bool, lines: usize, source: &str) -> Result<(), CliError> {
    use std::io::Write;
    let id = resolve(conn, id).await?;
    let q = format!("id={id}&lines={lines}&follow=false&ansi=false&source={source}");
    let Some((data, mut offset)) = fetch_log(conn, &q).await? else {
        return Err(CliError::Input(format!("VM {id} not found")));
    };
    let mut out = std::io::stdout();
    let write = |out: &mut std::io::Stdout, d: &[u8]| out.write_all(d).and_then(|()| out.flush());
    write(&mut out, &data).map_err(|e| CliError::Failed(format!("stdout: {e}")))?;
    if !follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(POLL).await;
        let q = format!("id={id}&offset={}&source={source}", offset.unwrap_or(0));
        match fetch_log(conn, &q).await? {
            Some((data, next)) => {
                write(&mut out, &data).map_err(|e| CliError::Failed(format!("stdout: {e}")))?;
                offset = next.or(offset);
            }
            None => {
                eprintln!("VM {id} was removed");
                return Ok(());
            }
        }
    }
}

async fn stop(conn: &Conn, id: &str, force: bool) -> Result<(), CliError> {
    let id = resolve(conn, id).await?;
    let start = Instant::now();
    if force {
        conn.vmm.stop_vm(Id { id: id.clone() }).await.map_err(|e| conn.err(e))?;
        println!("Stopped VM {id} (forced)");
    } else {
        println!("Shutting down VM {id} (asking the guest to power off)…");
        conn.vmm
            .shutdown_vm(Id { id: id.clone() })
            .await
            .map_err(|e| conn.err(e))?;
        let vm = get_info(conn, &id).await?;
        if !vm.shutdown_progress.is_empty() {
            println!("Last shutdown progress: {}", vm.shutdown_progress);
        }
        println!("VM {id} is {} ({:.1}s)", vm.status, start.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn upgrade(conn: &Conn, a: UpgradeArgs) -> Result<(), CliError> {
    let id = resolve(conn, &a.id).await?;
    let vm = get_info(conn, &id).await?;
    let running = matches!(vm.status.as_str(), "running" | "restarting");
    if running && !a.restart {
        return Err(CliError::Input(format!(
            "VM {id} is {}; stop it first or pass --restart",
            vm.status
        )));
    }
    let existing = vm.configuration.map(|c| c.compose_file).unwrap_or_default();
    let mut doc = AppComposeDoc::parse(&existing)?;
    doc.docker_compose_file = Some(read_text(&a.compose)?.into());
    let vars = read_env(&a.keys)?;
    if a.keys.env_file.is_some() {
        if !doc.kms_enabled() {
            return Err(CliError::Input(
                "--env-file needs kms_enabled in the VM's app-compose.json".into(),
            ));
        }
        doc.allowed_envs = Some(vars.iter().map(|v| v.key.clone()).collect::<Vec<_>>().into());
    }
    let app_compose = doc.to_json()?;
    if running {
        println!("Shutting down VM {id}…");
        conn.vmm
            .shutdown_vm(Id { id: id.clone() })
            .await
            .map_err(|e| conn.err(e))?;
    }
    conn.vmm
        .upgrade_app(UpdateVmRequest {
            id: id.clone(),
            compose_file: app_compose.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| conn.err(e))?;
    println!("Upgraded VM {id}: compose hash {}", compose::compose_hash(&app_compose));
    if a.keys.env_file.is_some() {
        // The app id the guest will use, as the manager now reports it (a pinned or instance app id stays;
        // otherwise it follows the new compose hash).
        let app_id = get_info(conn, &id).await?.app_id;
        let urls = kms_urls(conn, &a.keys).await?;
        let blob = encrypt_for_app(&vars, &app_id, &urls, &a.keys).await?;
        conn.vmm
            .update_vm(UpdateVmRequest {
                id: id.clone(),
                encrypted_env: blob,
                ..Default::default()
            })
            .await
            .map_err(|e| conn.err(e))?;
        println!(
            "Updated {} encrypted environment variable(s) for app {app_id}",
            vars.len()
        );
    }
    if running {
        conn.vmm
            .start_vm(Id { id: id.clone() })
            .await
            .map_err(|e| conn.err(e))?;
        println!("Started VM {id}");
        return follow_boot(conn, &id, &a.wait).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_alignment() {
        let rows = [["A", "BB"].map(String::from), ["CCC", "D"].map(String::from)];
        assert_eq!(table(&rows), "A    BB\nCCC  D\n");
    }
}
