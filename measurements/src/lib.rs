//! dstack measurements: TDX quote parsing and verification, event-log parsing and replay,
//! MRTD / RTMR prediction, and the published `measurements.json` format.
//!
//! Hex in every JSON this crate writes is lowercase without `0x`.

pub mod authenticode;
pub mod eventlog;
pub mod hexser;
pub mod mrtd;
pub mod predict;
pub mod published;
pub mod quote;
pub mod rtmr;
pub mod sim;
pub mod verify;
