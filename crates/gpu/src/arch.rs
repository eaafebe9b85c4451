//! GPU architectures we compile kernels for.

use std::fmt;
use std::str::FromStr;

/// A compile target such as `sm_90a` (Hopper with wgmma/setmaxnreg) or `sm_80`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    /// The `a` suffix: architecture-specific features (wgmma on sm_90a).
    pub specific: bool,
}

impl Arch {
    pub const SM80: Arch = Arch { major: 8, minor: 0, specific: false };
    pub const SM89: Arch = Arch { major: 8, minor: 9, specific: false };
    pub const SM90A: Arch = Arch { major: 9, minor: 0, specific: true };

    /// The target to build for a device of compute capability `major.minor`: Hopper gets
    /// sm_90a so wgmma is available; everything else its own plain target.
    pub fn for_compute_capability(major: u32, minor: u32) -> Arch {
        Arch { major, minor, specific: major == 9 && minor == 0 }
    }

    /// True when kernels written for `self` use Hopper-only instructions.
    pub fn is_hopper(self) -> bool {
        self.major == 9
    }

    /// Compute capability as an integer (90 for sm_90a).
    pub fn sm(self) -> u32 {
        self.major * 10 + self.minor
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}{}", self.major, self.minor, if self.specific { "a" } else { "" })
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad architecture {s:?}: expected e.g. sm_90a, sm_89 or sm_80");
        let digits = s.strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, specific) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        let major: u32 = major.parse().map_err(|_| bad())?;
        let minor: u32 = minor.parse().map_err(|_| bad())?;
        if major < 8 {
            return Err(format!(
                "{s}: radix-sparse needs sm_80 or newer (mma.sync m16n8k16, cp.async)"
            ));
        }
        Ok(Arch { major, minor, specific })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_picks_sm90a_for_hopper() {
        for s in ["sm_90a", "sm_80", "sm_89", "sm_100a", "sm_120"] {
            assert_eq!(s.parse::<Arch>().unwrap().to_string(), s);
        }
        assert_eq!(Arch::for_compute_capability(9, 0), Arch::SM90A);
        assert_eq!(Arch::for_compute_capability(8, 9), Arch::SM89);
        assert!("sm_70".parse::<Arch>().is_err());
        assert!("compute_90".parse::<Arch>().is_err());
        assert!("sm_9x".parse::<Arch>().is_err());
    }
}
