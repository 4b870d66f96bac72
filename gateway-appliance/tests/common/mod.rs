//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod backend;
pub mod cluster;
pub mod hello;
pub mod netns;
pub mod sim;
