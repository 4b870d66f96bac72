//! x86_64 boot setup: kernel loading, zero page, identity page tables, long-mode registers, CPUID, MSRs,
//! LAPIC, the MP table and ACPI tables (a pure function of the VM shape, shared with the measurement
//! predictor).

pub mod acpi;
pub mod aml;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
