//! The VM manager daemon (`dstack-vmm`): dstack-compatible `Vmm` pRPC API over a unix socket (and optionally
//! TCP with bearer tokens), persisted per-VM state, CID pool, resource accounting, a process supervisor with
//! auto-restart, pluggable backends (`kvm`: our VMM; `tcg`: QEMU emulation) and per-VM host services (host
//! API, simulated TDX module) on the VM's vsock unix sockets.
//!
//! - [`config`] — `vmm.toml`.
//! - [`state`] — work directory layout, manifests, CID pool.
//! - [`supervisor`] — processes, logs, rlimits.
//! - [`backend`] — command lines for `kvm` and `tcg`.
//! - [`bridge`] — bridge networking: managed bridge, per-VM taps, dnsmasq DHCP, isolation, NAT.
//! - [`vms`] — the registry and lifecycle ([`Manager`]).
//! - [`services`] — host API + simulated TDX per VM; host-shared files.
//! - [`validate`] — request checks.
//! - [`api`] — the `Vmm` service and the TCP auth gate.
//! - [`dashboard`] — the HTTP front (pRPC, guest API proxy, logs, web dashboard).
//! - [`guest_proxy`] — `ProxiedGuestApi` over hybrid vsock; [`qmp`], [`shutdown`] — graceful `ShutdownVm`.

pub mod api;
pub mod backend;
pub mod bridge;
pub mod config;
pub mod dashboard;
pub mod guest_proxy;
pub mod qmp;
pub mod services;
pub mod shutdown;
pub mod state;
pub mod supervisor;
pub mod tdx_backend;
pub mod validate;
pub mod vms;

pub use api::{VmmApi, router};
pub use backend::{Backend, BackendError, Image, KvmBackend, LaunchInput, TcgBackend, TdxBackend};
pub use config::{BackendKind, VmmConfig};
pub use vms::{Manager, ManagerError};
