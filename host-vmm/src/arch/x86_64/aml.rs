//! AML encoding, shared with the measurement predictor (see `dstack-acpi`).

pub use dstack_acpi::aml::*;
