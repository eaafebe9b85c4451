//! Stop strings matched incrementally: text is fed once, byte by byte, through an
//! Aho-Corasick automaton whose state survives between steps, so a step costs the bytes
//! it adds whatever the number or length of the stop strings (searching the held-back
//! text for each string on every token cost seconds with 15 strings of 1 MB).
//!
//! The automaton's state is the longest suffix of the text fed that is a prefix of some
//! stop string (a trie node); its depth is how much of the text might still become a
//! stop string, which is exactly what must be held back from the client.

use std::collections::HashMap;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};

/// Where a stop string was found, in bytes since the matcher started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopMatch {
    /// Where the stop string starts: the output ends here.
    pub start: usize,
}

/// Matches a set of stop strings against text fed piece by piece.
pub struct StopMatcher {
    nfa: NFA,
    state: StateID,
    /// Depth (bytes of a stop string matched so far) of every state: the trie node of
    /// each stop-string prefix.
    depth: HashMap<StateID, usize>,
    /// Bytes fed so far.
    fed: usize,
}

impl StopMatcher {
    /// A matcher for `stops` (none when the list is empty). Building costs the total
    /// bytes of the strings, which the request rules bound.
    pub fn new(stops: &[String]) -> Option<Self> {
        let stops: Vec<&str> = stops.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
        if stops.is_empty() {
            return None;
        }
        // Standard semantics report a match as soon as its last byte is seen, which is
        // what a stream needs; the other kinds look ahead for a longer match.
        let nfa = NFA::builder()
            .match_kind(MatchKind::Standard)
            .build(&stops)
            .expect("a few KiB of stop strings always fit the automaton's limits");
        let start = nfa.start_state(Anchored::No).expect("unanchored searches are built");
        let mut depth = HashMap::from([(start, 0)]);
        for s in &stops {
            let mut sid = start;
            for (i, &b) in s.as_bytes().iter().enumerate() {
                // Feeding a stop string's prefix from the start walks its trie path.
                sid = nfa.next_state(Anchored::No, sid, b);
                depth.insert(sid, i + 1);
            }
        }
        Some(Self { nfa, state: start, depth, fed: 0 })
    }

    /// Feeds `text`; returns the first stop string that ends in it (the earliest end;
    /// of several ending there, the longest).
    pub fn feed(&mut self, text: &str) -> Option<StopMatch> {
        for &b in text.as_bytes() {
            self.state = self.nfa.next_state(Anchored::No, self.state, b);
            self.fed += 1;
            if self.nfa.is_match(self.state) {
                let len = (0..self.nfa.match_len(self.state))
                    .map(|i| self.nfa.pattern_len(self.nfa.match_pattern(self.state, i)))
                    .max()
                    .unwrap_or(0);
                return Some(StopMatch { start: self.fed - len });
            }
        }
        None
    }

    /// Bytes at the end of the text fed that are the start of some stop string: they
    /// must be held back until the text either completes or leaves it.
    pub fn pending(&self) -> usize {
        self.depth.get(&self.state).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn matches_across_pieces_and_reports_where_the_stop_starts() {
        let mut m = matcher(&["STOP", "</s>"]);
        assert_eq!(m.feed("one ST"), None);
        assert_eq!(m.pending(), 2);
        assert_eq!(m.feed("O"), None);
        assert_eq!(m.pending(), 3);
        assert_eq!(m.feed("P two"), Some(StopMatch { start: 4 }));
    }

    #[test]
    fn a_partial_match_that_breaks_releases_its_bytes() {
        let mut m = matcher(&["abc"]);
        assert_eq!(m.feed("xab"), None);
        assert_eq!(m.pending(), 2);
        assert_eq!(m.feed("x"), None);
        assert_eq!(m.pending(), 0);
        // The failure link keeps a suffix that still starts the string.
        assert_eq!(m.feed("aab"), None);
        assert_eq!(m.pending(), 2);
        assert_eq!(m.feed("c"), Some(StopMatch { start: 5 }));
    }

    #[test]
    fn the_first_end_wins_and_of_equal_ends_the_longest() {
        let mut m = matcher(&["</s>", "<end>"]);
        assert_eq!(m.feed("abc<end>x</s>"), Some(StopMatch { start: 3 }));
        let mut m = matcher(&["c", "abc"]);
        assert_eq!(m.feed("zabc"), Some(StopMatch { start: 1 }));
    }

    #[test]
    fn empty_lists_need_no_matcher() {
        assert!(StopMatcher::new(&[]).is_none());
        assert!(StopMatcher::new(&[String::new()]).is_none());
    }

    #[test]
    fn cost_is_per_byte_fed_not_per_stop_byte() {
        // 15 stop strings of 64 KiB: feeding 400 bytes is instant (it took seconds when
        // every step searched the held-back text for every string).
        let stops: Vec<String> =
            (0..15u8).map(|i| char::from(b'A' + i).to_string().repeat(64 << 10)).collect();
        let mut m = StopMatcher::new(&stops).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..400 {
            assert_eq!(m.feed("A"), None);
        }
        assert_eq!(m.pending(), 400);
        assert!(t.elapsed() < std::time::Duration::from_millis(50), "{:?}", t.elapsed());
    }
}
