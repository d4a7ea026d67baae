//! The semantic cache's verifier reads what any client sends: any two texts are judged
//! without a panic, a question always asks what it asks itself, and the exact key's normal
//! form is defined for any text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_policies::same_question::{normal_form, verify, Check};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (stored, asked) = text.split_once('\u{1}').unwrap_or((text, text));
    let _ = verify(stored, asked, 0.8, 0.96);
    let _ = normal_form(asked);
    let itself = verify(stored, stored, 0.5, 0.96);
    assert!(
        itself.is_ok() || itself == Err(Check::TooLong),
        "{stored:?} differs from itself: {itself:?}"
    );
});
