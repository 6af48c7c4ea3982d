//! Join codes: 10 letters from [`ALPHABET`] (no vowels, so no words; no look-alikes such as
//! I/1, O/0), about 43 bits, shown as `XXX-XXXX-XXX` and read case- and dash-insensitively.

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
        unimplemented!("H-prims")
    }

    /// Reads a code as a person may type it: any case, dashes and spaces anywhere.
    pub fn parse(s: &str) -> Result<Self, CodeError> {
        unimplemented!("H-prims")
    }

    /// The 10 canonical letters (what gets hashed).
    pub fn canonical(&self) -> &str {
        unimplemented!("H-prims")
    }

    /// `XXX-XXXX-XXX`, how it is shown.
    pub fn display(&self) -> String {
        unimplemented!("H-prims")
    }
}
