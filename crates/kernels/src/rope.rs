//! Rotary position embedding frequencies, computed as Hugging Face transformers does
//! (f32 arithmetic), including Llama 3's `rope_scaling` ("rope_type": "llama3").

/// Llama 3's frequency-dependent scaling of the rotary frequencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// How positions turn into rotation angles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub head_dim: usize,
    pub theta: f32,
    pub llama3: Option<Llama3Scaling>,
}

impl RopeConfig {
    /// `inv_freq[i]` for the pair (i, i + head_dim/2): `1 / theta^(2i/head_dim)`, then
    /// Llama 3's scaling when configured (wavelengths longer than
    /// `original_max / low_freq_factor` are divided by `factor`, shorter than
    /// `original_max / high_freq_factor` kept, those between blended smoothly).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        let base: Vec<f32> =
            (0..self.head_dim / 2).map(|i| 1.0f32 / self.theta.powf((2 * i) as f32 / d)).collect();
        let Some(s) = self.llama3 else { return base };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// Rotates one head in place ("rotate_half" pairing), angles in f32 as the kernel and HF
/// compute them, the rotation itself in f64.
pub fn rotate_head(x: &mut [f64], position: usize, inv_freq: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let angle = (position as f32 * inv_freq[i]) as f64;
        let (s, c) = angle.sin_cos();
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_rope_frequencies() {
        let f = RopeConfig { head_dim: 8, theta: 10000.0, llama3: None }.inv_freq();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.1).abs() < 1e-7 && (f[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = RopeConfig { head_dim: 128, theta: 500000.0, llama3: None }.inv_freq();
        let scaled = RopeConfig { head_dim: 128, theta: 500000.0, llama3: Some(s) }.inv_freq();
        assert_eq!(plain[0], scaled[0]); // wavelength 2π < 2048: untouched
        assert_eq!(plain[63] / 8.0, scaled[63]); // very long wavelength: divided by factor
        let mid = scaled.iter().zip(&plain).filter(|(a, b)| *a != *b && **a != **b / 8.0).count();
        assert!(mid > 0, "some frequencies fall in the smooth band");
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let f = RopeConfig { head_dim: 8, theta: 10000.0, llama3: None }.inv_freq();
        let x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut y = x.clone();
        rotate_head(&mut y, 0, &f);
        assert_eq!(x, y);
        rotate_head(&mut y, 1234, &f);
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((n(&x) - n(&y)).abs() < 1e-9);
    }
}
