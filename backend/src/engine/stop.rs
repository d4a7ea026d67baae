//! Where does a reply stop? OpenAI's `stop` sequences over streamed text: generation ends
//! where any of them first appears, and the stop sequence itself is never sent.
//!
//! A stop sequence can arrive split across tokens, so text that could still turn out to be
//! the start of one is held back until it is clearly not (or until generation ends for
//! another reason, when it is released). Nothing is ever sent and then taken back.

/// What the text generated so far means for the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Send this text (possibly empty) and carry on.
    Continue(String),
    /// A stop sequence appeared: send this last text (what preceded it) and stop.
    Stopped(String),
}

/// One sequence's stop sequences and the text held back for them.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    /// Empty stop strings are dropped: they would match before any text.
    pub fn new(stops: impl IntoIterator<Item = String>) -> StopStrings {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds newly decoded text (whole characters, as [`crate::model::tokenizer::TextStream`]
    /// gives them).
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            return StopCheck::Stopped(std::mem::take(&mut self.held));
        }
        // Hold the longest tail that some stop sequence starts with. Earlier text cannot
        // begin a match any more: a stop starting there would be found whole above, or
        // would need a longer tail.
        let keep = self
            .held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let tail = &self.held[at..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep);
        StopCheck::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// Generation ended for another reason (length, end of sequence): the held text.
    pub fn finish(self) -> String {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()))
    }

    fn go(s: &str) -> StopCheck {
        StopCheck::Continue(s.to_owned())
    }

    #[test]
    fn a_stop_split_across_tokens_is_held_back_then_cut() {
        let mut s = stops(&["\nUser:"]);
        assert_eq!(s.push("Hello"), go("Hello"));
        assert_eq!(s.push(" there\n"), go(" there"));
        assert_eq!(s.push("Us"), go(""));
        assert_eq!(s.push("er: hi"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let mut s = stops(&["END"]);
        assert_eq!(s.push("the EN"), go("the "));
        assert_eq!(s.push("emy"), go("ENemy"));
        // Released at the end when generation stops otherwise.
        assert_eq!(s.push(" E"), go(" "));
        assert_eq!(s.finish(), "E");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_text_before_it_is_kept() {
        let mut s = stops(&["world", "lo w", ""]);
        assert_eq!(s.push("hello world"), StopCheck::Stopped("hel".to_owned()));
        let mut s = stops(&["é!"]);
        assert_eq!(s.push("café"), go("caf"));
        assert_eq!(s.push("?"), go("é?"));
        let mut none = stops(&[]);
        assert_eq!(none.push("anything"), go("anything"));
    }
}
