use super::*;

/// A pair that embeds very close: only the structural checks can tell it apart.
const CLOSE: f32 = 0.99;
/// A pair that embeds well below the strict threshold: the words must line up.
const LOOSE: f32 = 0.80;
const STRICT: f32 = 0.96;

fn differs(a: &str, b: &str, why: Check) {
    assert_eq!(verify(a, b, CLOSE, STRICT), Err(why), "{a} / {b}");
    assert_eq!(verify(b, a, CLOSE, STRICT), Err(why), "{b} / {a}");
}

fn same(a: &str, b: &str, similarity: f32) {
    assert_eq!(verify(a, b, similarity, STRICT), Ok(()), "{a} / {b}");
    assert_eq!(verify(b, a, similarity, STRICT), Ok(()), "{b} / {a}");
}

#[test]
fn swapped_roles_differ_and_moved_clauses_do_not() {
    differs(
        "Can an employer sue an employee for quitting?",
        "Can an employee sue an employer for quitting?",
        Check::RoleSwap,
    );
    // A typo does not hide a swap.
    assert_eq!(
        verify(
            "Can a tenant evict a landlord for not paying rent?",
            "Can a landlrod evict a tenant for not paying rent?",
            LOOSE,
            STRICT
        ),
        Err(Check::RoleSwap)
    );
    differs(
        "Can I sue my neighbour over a fence?",
        "Can my neighbour sue me over a fence?",
        Check::RoleSwap,
    );
    differs(
        "How long is the train from Lyon to Milan?",
        "How long is the train from Milan to Lyon?",
        Check::RoleSwap,
    );
    same(
        "In Rust, how do I split a string on commas?",
        "How do I split a string on commas in Rust?",
        LOOSE,
    );
    same(
        "Did the Normans invade England?",
        "Was England invaded by the Normans?",
        CLOSE,
    );
    same(
        "What is the difference between a lease and a licence?",
        "What is the difference between a licence and a lease?",
        LOOSE,
    );
}

#[test]
fn reversed_and_opposite_comparisons_differ() {
    differs(
        "Is leasing a car cheaper than financing one?",
        "Is financing a car cheaper than leasing one?",
        Check::Comparison,
    );
    differs(
        "Is coffee healthier before or after a workout, and is tea cheaper than coffee?",
        "Is coffee healthier before or after a workout, and is tea more expensive than coffee?",
        Check::Comparison,
    );
    differs(
        "Should I stretch before running?",
        "Should I stretch after running?",
        Check::Comparison,
    );
    differs(
        "Why do interest rates increase during inflation?",
        "Why do interest rates decrease during inflation?",
        Check::Comparison,
    );
    differs(
        "Is a 2-year loan costlier per month than a 5-year loan?",
        "Is a 5-year loan costlier per month than a 2-year loan?",
        Check::Comparison,
    );
    same(
        "Is tea cheaper than coffee?",
        "Is coffee more expensive than tea?",
        CLOSE,
    );
    same(
        "Is tea cheaper than coffee?",
        "Is tea less expensive than coffee?",
        CLOSE,
    );
}

#[test]
fn negation_explicit_and_morphological_differs() {
    differs(
        "Is it safe to eat raw cookie dough?",
        "Is it not safe to eat raw cookie dough?",
        Check::Negation,
    );
    differs(
        "Is it legal to record a phone call?",
        "Is it illegal to record a phone call?",
        Check::Negation,
    );
    differs(
        "Why are some mushrooms harmful to dogs?",
        "Why are some mushrooms harmless to dogs?",
        Check::Negation,
    );
    differs(
        "Can I travel to Canada with a passport?",
        "Can I travel to Canada without a passport?",
        Check::Negation,
    );
    differs(
        "Is it possible to reverse a vasectomy?",
        "Is it impossible to reverse a vasectomy?",
        Check::Negation,
    );
    same("Isn't it unsafe?", "Is it not unsafe?", CLOSE);
}

#[test]
fn numbers_and_units_differ_in_any_script() {
    differs(
        "How many calories are in 2 bananas?",
        "How many calories are in 3 bananas?",
        Check::Numbers,
    );
    differs(
        "What is 7 times 8?",
        "What is seven times nine?",
        Check::Numbers,
    );
    differs(
        "How do I split a bill among ٤ people?",
        "How do I split a bill among 5 people?",
        Check::Numbers,
    );
    differs(
        "How far is 5 km in steps?",
        "How far is 5 miles in steps?",
        Check::Units,
    );
    differs(
        "Convert 20 °C to Fahrenheit",
        "Convert 20 °F to Celsius",
        Check::Units,
    );
    same(
        "How many calories are in two bananas?",
        "How many calories are in 2 bananas?",
        LOOSE,
    );
    same("Is ٤ a prime number?", "Is 4 a prime number?", LOOSE);
    same(
        "Can I take 3,000 dollars in cash abroad?",
        "Can I take $3000 in cash abroad?",
        LOOSE,
    );
    differs(
        "Can I take $3000 in cash abroad?",
        "Can I take €3000 in cash abroad?",
        Check::Units,
    );
}

#[test]
fn dates_and_relative_times_differ() {
    differs(
        "Who won the chess olympiad last year?",
        "Who won the chess olympiad next year?",
        Check::Time,
    );
    differs(
        "What was the weather like in Oslo yesterday?",
        "What was the weather like in Oslo tomorrow?",
        Check::Time,
    );
    differs(
        "What were the top films of 2015?",
        "What were the top films of 2018?",
        Check::Time,
    );
    differs(
        "Which museums open on Tuesday in Vienna?",
        "Which museums open on Sunday in Vienna?",
        Check::Time,
    );
    same(
        "what happened in 1989 in berlin",
        "What happened in Berlin in 1989?",
        LOOSE,
    );
}

#[test]
fn different_names_differ_but_casing_does_not() {
    differs(
        "Who founded Nintendo?",
        "Who founded Sega?",
        Check::Entities,
    );
    differs(
        "What is the population of Portugal?",
        "What is the population of Poland?",
        Check::Entities,
    );
    same(
        "WHAT IS THE POPULATION OF PORTUGAL",
        "what is the population of portugal?",
        LOOSE,
    );
    same(
        "what is the population of Portugal",
        "What is the population of Portgual?",
        LOOSE,
    );
}

#[test]
fn different_quoted_text_differs() {
    differs(
        "Translate \"see you soon\" into Dutch",
        "Translate \"see you later\" into Dutch",
        Check::Quoted,
    );
    differs(
        "What does ‘carpe diem’ mean?",
        "What does ‘carpe noctem’ mean?",
        Check::Quoted,
    );
    same(
        "Translate \"See you soon\" into Dutch.",
        "please translate \"see you soon\" into dutch",
        LOOSE,
    );
}

#[test]
fn below_the_strict_threshold_every_word_needs_its_match() {
    assert_eq!(
        verify(
            "How do I reset my router?",
            "How do I reset my modem?",
            LOOSE,
            STRICT
        ),
        Err(Check::Wording)
    );
    assert_eq!(
        verify(
            "How do I reset my password?",
            "How do I reset my email password?",
            LOOSE,
            STRICT
        ),
        Err(Check::Wording)
    );
    // At the strict threshold the embedding is trusted with synonyms.
    assert_eq!(
        verify(
            "Is aspirin safe for kids?",
            "Is aspirin safe for children?",
            0.97,
            STRICT
        ),
        Ok(())
    );
    for (a, b) in [
        (
            "How do I reset my password?",
            "Could you please tell me how I can reset my password? Thanks!",
        ),
        (
            "How do I remove a git submodule?",
            "how do i remvoe a git submodule",
        ),
        (
            "What's the best way to store fresh basil?",
            "whats the best way to store fresh basil",
        ),
    ] {
        same(a, b, LOOSE);
    }
}

#[test]
fn the_structural_checks_alone_leave_wording_to_another_judge() {
    assert_eq!(
        verify_structure("How do I reset my router?", "How do I reset my modem?"),
        Ok(())
    );
    assert_eq!(
        verify_structure("Is it legal to fish here?", "Is it illegal to fish here?"),
        Err(Check::Negation)
    );
}

#[test]
fn questions_past_the_word_bound_are_not_compared() {
    let long = "why ".repeat(MAX_WORDS + 1);
    assert_eq!(verify(&long, &long, 1.0, STRICT), Err(Check::TooLong));
    // A huge prompt of distinct words (the worst case for the order checks) is turned down
    // before it is analysed.
    let huge: String = (0..200_000).map(|i| format!("w{i} ")).collect();
    assert_eq!(
        verify("What is rust?", &huge, 0.99, STRICT),
        Err(Check::TooLong)
    );
    let at_bound = "rust ".repeat(MAX_WORDS);
    assert_eq!(verify(&at_bound, &at_bound, 1.0, STRICT), Ok(()));
}
