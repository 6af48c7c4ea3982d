//! Join codes: 10 letters from [`ALPHABET`] (no vowels, so no words; no look-alikes such as
//! I/1, O/0), about 43 bits, shown as `XXX-XXXX-XXX` and read case- and dash-insensitively.

use rand::Rng as _;

/// The 20 letters codes are made of.
pub const ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a code.
pub const LEN: usize = 10;

/// A well-formed join code (canonical: 10 upper-case letters of [`ALPHABET`]).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinCode(/* private */ [u8; LEN]);

/// Why a string is not a join code (the API answers all of these like an unknown code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Not 10 letters once dashes and spaces are removed.
    #[error("a join code has 10 letters")]
    Length,
    /// A character outside the alphabet (any case), dashes and spaces.
    #[error("a join code has only the letters {}", "BCDFGHJKLMNPQRSTVWXZ")]
    Character,
}

impl std::fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A code is a bearer secret: never in logs.
        f.write_str("JoinCode(<redacted>)")
    }
}

impl JoinCode {
    /// A fresh code from the CSPRNG, uniform over the alphabet (no modulo bias).
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut code = [0u8; LEN];
        for letter in &mut code {
            // `random_range` is unbiased (rejection sampling), unlike `random::<u8>() % 20`.
            *letter = ALPHABET[rng.random_range(0..ALPHABET.len())];
        }
        Self(code)
    }

    /// Reads a code as a person may type it: any case, dashes and spaces anywhere.
    pub fn parse(s: &str) -> Result<Self, CodeError> {
        let mut code = [0u8; LEN];
        // Letters seen; counted past `LEN` (without storing) so too-long input is `Length`.
        let mut n = 0usize;
        // By `char`, not byte: a multi-byte character is one refused character, never a
        // slice of one (and non-ASCII letters never match: `to_ascii_uppercase` leaves them).
        for c in s.chars() {
            if c == '-' || c.is_ascii_whitespace() {
                continue;
            }
            let upper = c.to_ascii_uppercase();
            if !upper.is_ascii() || !ALPHABET.contains(&(upper as u8)) {
                return Err(CodeError::Character);
            }
            if let Some(slot) = code.get_mut(n) {
                *slot = upper as u8;
            }
            n = n.saturating_add(1);
        }
        if n != LEN {
            return Err(CodeError::Length);
        }
        Ok(Self(code))
    }

    /// The 10 canonical letters (what gets hashed).
    pub fn canonical(&self) -> &str {
        // Always ASCII: only `generate` and `parse` build a code, from `ALPHABET` letters.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// `XXX-XXXX-XXX`, how it is shown.
    pub fn display(&self) -> String {
        let mut out = String::with_capacity(LEN + 2);
        for (i, &letter) in self.0.iter().enumerate() {
            // Groups of 3, 4 and 3: short enough to read out loud.
            if i == 3 || i == 7 {
                out.push('-');
            }
            out.push(char::from(letter));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_codes_round_trip() {
        for _ in 0..1000 {
            let code = JoinCode::generate();
            let canonical = code.canonical();
            assert_eq!(canonical.len(), LEN);
            assert!(
                canonical.bytes().all(|b| ALPHABET.contains(&b)),
                "{canonical}"
            );
            let shown = code.display();
            assert_eq!(shown.len(), LEN + 2);
            assert_eq!(&shown[3..4], "-");
            assert_eq!(&shown[8..9], "-");
            assert_eq!(shown.replace('-', ""), canonical);
            assert_eq!(JoinCode::parse(&shown).unwrap(), code);
            assert_eq!(JoinCode::parse(canonical).unwrap(), code);
            assert_eq!(JoinCode::parse(&shown.to_lowercase()).unwrap(), code);
        }
    }

    #[test]
    fn display_groups_three_four_three() {
        let code = JoinCode::parse("BCDFGHJKLM").unwrap();
        assert_eq!(code.canonical(), "BCDFGHJKLM");
        assert_eq!(code.display(), "BCD-FGHJ-KLM");
    }

    #[test]
    fn case_dashes_and_spaces_do_not_matter() {
        let expected = JoinCode::parse("BCDFGHJKLM").unwrap();
        for typed in [
            "bcd-fghj-klm",
            "BCD-FGHJ-KLM",
            " bcd fghj klm ",
            "bCd-FgHj-KlM",
            "b-c-d-f-g-h-j-k-l-m",
            "\tBCD\nFGHJ\r\nKLM\u{c}",
            "--BCDFGHJKLM--",
            "BCD - FGHJ - KLM",
        ] {
            assert_eq!(JoinCode::parse(typed), Ok(expected.clone()), "{typed:?}");
        }
    }

    #[test]
    fn every_alphabet_letter_parses_in_both_cases() {
        for &letter in ALPHABET {
            let upper = char::from(letter).to_string().repeat(LEN);
            let code = JoinCode::parse(&upper.to_lowercase()).unwrap();
            assert_eq!(code.canonical(), upper);
        }
    }

    #[test]
    fn bad_characters_are_refused() {
        for bad in [
            // Vowels, and Y, which is not in the alphabet either.
            "ACDFGHJKLM",
            "BCDFGHJKLE",
            "BCDFGHIKLM",
            "BCDFGHJKLO",
            "BCDFGHJKLU",
            "BCDFGHJKLY",
            "bcdfghjkla",
            // Digits, including the look-alikes the alphabet avoids.
            "BCDFGHJKL0",
            "BCDFGHJKL1",
            "1234567890",
            // Punctuation other than dashes.
            "BCD_FGHJ_KLM",
            "BCD.FGHJ.KLM",
            "BCD+FGHJ+KLM",
            "BCDFGHJKLM\0",
            // Unicode look-alikes: Cyrillic В and С, full-width Ｂ, a non-breaking space,
            // an en dash, a combining accent, and a letter whose upper case is two letters.
            "\u{412}\u{421}DFGHJKLM",
            "\u{ff22}CDFGHJKLM",
            "BCD\u{a0}FGHJKLM",
            "BCD\u{2013}FGHJ\u{2013}KLM",
            "BCDFGHJKLM\u{301}",
            "BCDFGHJKL\u{df}",
            "\u{1f600}BCDFGHJKL",
            // Too long *and* a bad character: the character is what is reported.
            "BCDFGHJKLMNPQRSTVWXZA",
        ] {
            assert_eq!(JoinCode::parse(bad), Err(CodeError::Character), "{bad:?}");
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let long = "B".repeat(100_000);
        for bad in [
            "",
            " ",
            "-",
            "---- -- \t",
            "B",
            "BCDFGHJKL",
            "BCD-FGHJ-KL",
            "BCDFGHJKLMN",
            "BCD-FGHJ-KLMN",
            "BCDFGHJKLMBCDFGHJKLM",
            &long,
        ] {
            assert_eq!(JoinCode::parse(bad), Err(CodeError::Length), "{bad:?}");
        }
    }

    #[test]
    fn debug_hides_the_code() {
        let code = JoinCode::parse("BCDFGHJKLM").unwrap();
        let shown = format!("{code:?}");
        assert_eq!(shown, "JoinCode(<redacted>)");
    }

    /// 10 000 codes, 100 000 letters: each letter is expected 5 000 times overall (σ ≈ 69) and
    /// 500 times per position (σ ≈ 22). The bounds sit more than 8σ away, so a correct
    /// generator does not fail (p < 10⁻¹⁴ for the whole test), while a broken one (a letter
    /// never drawn or drawn twice as often, a stuck position, a letter outside the alphabet)
    /// fails at once. Subtle bias (`% 20` of a byte) is below what a fixed bound can see
    /// without flaking; `random_range` is what rules it out.
    #[test]
    fn generated_letters_cover_the_alphabet_evenly() {
        const CODES: usize = 10_000;
        let mut total = [0usize; 256];
        let mut per_position = [[0usize; 256]; LEN];
        let mut distinct = HashSet::new();
        for _ in 0..CODES {
            let code = JoinCode::generate();
            for (pos, b) in code.canonical().bytes().enumerate() {
                total[usize::from(b)] += 1;
                per_position[pos][usize::from(b)] += 1;
            }
            distinct.insert(code.canonical().to_owned());
        }
        for b in 0..=255u8 {
            let n = total[usize::from(b)];
            if ALPHABET.contains(&b) {
                assert!(
                    (4_400..=5_600).contains(&n),
                    "{} drawn {n} times",
                    char::from(b)
                );
                for (pos, counts) in per_position.iter().enumerate() {
                    let m = counts[usize::from(b)];
                    assert!(
                        (300..=700).contains(&m),
                        "{} drawn {m} times at position {pos}",
                        char::from(b)
                    );
                }
            } else {
                assert_eq!(n, 0, "byte {b} is not in the alphabet");
            }
        }
        // 20¹⁰ ≈ 10¹³ codes: a few collisions among 10 000 would already mean a tiny space.
        assert!(distinct.len() >= CODES - 5, "{} distinct", distinct.len());
    }
}
