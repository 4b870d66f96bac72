//! The whole stack on one machine, shared by `cargo xtask demo` (the `dstack-demo` binary) and the
//! full-stack tests in `tests/`: a local OCI registry holding the demo app image, the KMS, the VM manager
//! with a guest image built by `image-build`, and verification of a running CVM from outside.
//!
//! Where the host has no usable hardware virtualization (our CI machines: `/dev/kvm` is PVM, DESIGN.md
//! §10) the VM manager runs the CVM under the `tcg` backend (QEMU software emulation) with the simulated
//! TDX module; everything about it says so.
//!
//! Inputs (environment; `cargo xtask test` and `cargo xtask demo` set them):
//! - `DSTACK_E2E_IMAGE`: an image directory from `dstack-image-build build` with guest-init as `/init`;
//! - `DSTACK_DEMO_APP_BIN`: the static `dstack-demo-app` binary (packaged into an OCI image here);
//! - `VHOST_DEVICE_VSOCK`: the `vhost-device-vsock` binary; `qemu-system-x86_64` and `mkfs.erofs` on PATH;
//! - `DSTACK_DOCKER_REGISTRY` (default `/usr/bin/docker-registry`, Debian `docker-registry`);
//! - with the gateway ([`Stack::start_with_gateway`]): `DSTACK_PEBBLE` / `DSTACK_PEBBLE_CHALLTESTSRV`
//!   (default `/usr/bin/pebble`, `/usr/bin/pebble-challtestsrv`, Debian `pebble`), root and `/dev/net/tun`;
//! - with the gateway CVM ([`Stack::start_with_gateway_cvm`]): pebble as above, `DSTACK_GATEWAY_BIN` (the static
//!   `dstack-gateway`) and optionally `DSTACK_XTASK` (see [`gateway_cvm`]).

pub mod gateway;
pub mod gateway_cvm;
pub mod pebble;
pub mod stack;
pub mod verify;

pub use gateway::Gateway;
pub use gateway_cvm::{GatewayCvm, GatewayCvmInputs};
pub use stack::{AppSpec, Inputs, KmsOptions, Stack, StackError};
pub use verify::{Verdict, verify_cvm};
