//! `dstack-oci`: build a reproducible one-layer OCI image for a static binary, push it to a registry.
//!
//! ```text
//! dstack-oci build --binary PATH --name NAME:TAG --out DIR [--env K=V]... [--port N]... [--docker-media-types]
//! dstack-oci push DIR --registry http://127.0.0.1:5000 --repo NAME --tag TAG
//! ```
//! `build` honours `SOURCE_DATE_EPOCH` (default 0) for mtimes and `created`; both commands print the manifest
//! digest on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dstack_oci::{ImageSpec, MediaTypes, Registry, build, read_layout, split_name_tag, write_layout};

#[derive(Parser)]
#[command(name = "dstack-oci", about = "Build and push reproducible one-layer OCI images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image with the binary at /app (the entrypoint) into an OCI layout directory.
    Build {
        /// The static executable to package.
        #[arg(long)]
        binary: PathBuf,
        /// Image name and tag, recorded in the layout's index.json (tag defaults to `latest`).
        #[arg(long)]
        name: String,
        /// Output OCI image layout directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Extra environment entries in the image config (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// TCP ports to list in ExposedPorts (repeatable; default 8080).
        #[arg(long = "port", value_name = "PORT")]
        ports: Vec<u16>,
        /// Use Docker schema 2 media types instead of OCI ones.
        #[arg(long)]
        docker_media_types: bool,
    },
    /// Push the image in an OCI layout directory to a plain-HTTP registry.
    Push {
        /// OCI image layout directory written by `build`.
        dir: PathBuf,
        /// Registry base URL, e.g. http://127.0.0.1:5000.
        #[arg(long)]
        registry: String,
        /// Repository name in the registry.
        #[arg(long)]
        repo: String,
        /// Tag to push as.
        #[arg(long)]
        tag: String,
    },
}

fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build {
            binary,
            name,
            out,
            env,
            ports,
            docker_media_types,
        } => {
            let data = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
            if !data.starts_with(b"\x7fELF") {
                bail!("{} is not an ELF executable", binary.display());
            }
            let spec = ImageSpec {
                binary: data,
                env,
                ports: if ports.is_empty() { vec![8080] } else { ports },
                epoch: source_date_epoch()?,
                media: if docker_media_types {
                    MediaTypes::Docker
                } else {
                    MediaTypes::Oci
                },
            };
            let image = build(&spec)?;
            let (name, tag) = split_name_tag(&name);
            write_layout(&out, &image, name, tag)?;
            eprintln!("built {name}:{tag} into {}", out.display());
            println!("{}", image.manifest.digest);
        }
        Cmd::Push {
            dir,
            registry,
            repo,
            tag,
        } => {
            let image = read_layout(&dir, Some(&tag))?;
            let reg = Registry::new(&registry)?;
            reg.ping()
                .await
                .with_context(|| format!("registry {registry} is not answering the v2 API"))?;
            let digest = reg.push_image(&repo, &tag, &image).await?;
            eprintln!("pushed {}/{repo}:{tag}", reg.authority());
            println!("{digest}");
        }
    }
    Ok(())
}
