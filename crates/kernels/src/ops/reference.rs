//! f64 CPU references of the small ops.

/// `residual + delta` rounded like the kernel stores it is the caller's business; this
/// normalises `x` rows: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm_reference(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let h = w.len();
    x.chunks(h)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
            row.iter().zip(w).map(move |(v, g)| v * inv * g).collect::<Vec<_>>()
        })
        .collect()
}

/// `silu(gate) * up` for `[rows, gate | up]`.
pub fn silu_mul_reference(gate_up: &[f64], inter: usize) -> Vec<f64> {
    gate_up
        .chunks(2 * inter)
        .flat_map(|row| {
            let (g, u) = row.split_at(inter);
            g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect::<Vec<_>>()
        })
        .collect()
}
