//! The configuration file: any text is a configuration or an error naming what is wrong.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_gateway::config::Config;

fuzz_target!(|text: &str| {
    let _ = Config::from_toml(text, &|_| None);
});
