//! Element types that live in device buffers.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    I32,
    U32,
    U8,
    /// OCP FP8 e4m3 ("float8_e4m3fn"), held in `u8` buffers: the FP8 GEMMs' inputs.
    F8E4M3,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::U8 | Self::F8E4M3 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F32 => "f32",
            Self::I32 => "i32",
            Self::U32 => "u32",
            Self::U8 => "u8",
            Self::F8E4M3 => "fp8_e4m3",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f32" | "fp32" | "float32" | "float" => Ok(Self::F32),
            "i32" | "int32" => Ok(Self::I32),
            "u32" | "uint32" => Ok(Self::U32),
            "u8" | "uint8" => Ok(Self::U8),
            "fp8" | "fp8_e4m3" | "e4m3" | "float8_e4m3fn" => Ok(Self::F8E4M3),
            other => Err(format!(
                "unknown dtype {other:?} (expected f16, bf16, f32, i32, u32, u8 or fp8_e4m3)"
            )),
        }
    }
}

/// A Rust type that can sit in a device buffer, tied to its `DType`.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, |$x:ident| $to:expr, |$y:ident| $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn to_f64(self) -> f64 {
                let $x = self;
                $to
            }
            fn from_f64($y: f64) -> Self {
                $from
            }
        }
    };
}

element!(f16, F16, |x| x.to_f64(), |v| f16::from_f64(v));
element!(bf16, BF16, |x| x.to_f64(), |v| bf16::from_f64(v));
element!(f32, F32, |x| x as f64, |v| v as f32);
element!(i32, I32, |x| x as f64, |v| v as i32);
element!(u32, U32, |x| x as f64, |v| v as u32);
element!(u8, U8, |x| x as f64, |v| v as u8);

/// Floating-point elements that kernels take as inputs (f16 or bf16).
pub trait HalfFloat: Element {}
impl HalfFloat for f16 {}
impl HalfFloat for bf16 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_dtypes() {
        for d in
            [DType::F16, DType::BF16, DType::F32, DType::I32, DType::U32, DType::U8, DType::F8E4M3]
        {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert!("f64".parse::<DType>().is_err());
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(<bf16 as Element>::DTYPE, DType::BF16);
    }
}
