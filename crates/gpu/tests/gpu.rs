//! GPU tests of the runtime layer and the cuBLASLt wrapper (`--features cuda`).
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::gemm::gemm_reference;
use std::time::{Duration, Instant};

use radix_gpu::{
    BLayout, Device, Element, Gemm, GpuError, HalfFloat, PinnedStaging, graph, require_gpu,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random<T: Element>(rng: &mut SmallRng, len: usize) -> Vec<T> {
    (0..len).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
}

fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for (o, r) in out.iter().zip(reference) {
        assert!(o.is_finite(), "non-finite output {o}");
        num += (o - r) * (o - r);
        den += r * r;
    }
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn device_reports_itself_and_copies_round_trip() {
    let dev = require_gpu();
    let info = dev.info();
    assert!(info.sm_count > 0 && info.total_memory > 0, "{info:?}");
    let data: Vec<i32> = (0..1001).map(|i| i * 7 - 3).collect();
    let mut buf = dev.upload(&data).unwrap();
    assert_eq!(buf.to_vec().unwrap(), data);
    buf.fill_bytes(0xFF).unwrap();
    assert!(buf.to_vec().unwrap().iter().all(|&v| v == -1));
    // Copies of the wrong size are errors, not undefined behaviour.
    assert!(matches!(buf.copy_from_host(&data[..10]), Err(GpuError::Invalid(_))));
    let mut small = vec![0i32; 3];
    assert!(matches!(buf.copy_to_host(&mut small), Err(GpuError::Invalid(_))));
    assert!(buf.copy_from_host_at(1000, &data[..2]).is_err());
}

/// Checks one GEMM against the f64 reference on fresh random data, output poisoned first.
/// For large shapes only `check_rows` sampled rows are compared (the reference is O(MNK)).
#[allow(clippy::too_many_arguments)]
fn check_gemm<T: HalfFloat, O: Element>(
    dev: &Device,
    gemm: &Gemm,
    (m, n, k): (usize, usize, usize),
    layout: BLayout,
    with_bias: bool,
    beta: f32,
    tol: f64,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let a: Vec<T> = random(&mut rng, m * k);
    let b: Vec<T> = random(&mut rng, n * k);
    let bias: Vec<O> = random(&mut rng, n);
    let prior: Vec<O> = random(&mut rng, m * n);
    let (da, db, dbias) =
        (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&bias).unwrap());
    let mut out = dev.alloc::<O>(m * n).unwrap();
    if beta != 0.0 {
        out.copy_from_host(&prior).unwrap();
    } else {
        out.fill_bytes(0xFF).unwrap(); // poison: NaN in f16/bf16/f32
    }
    gemm.matmul::<T, O>(m, n, k, &da, &db, layout, with_bias.then_some(&dbias), beta, &mut out)
        .unwrap();
    let got: Vec<f64> = out.to_vec().unwrap().iter().map(|v| v.to_f64()).collect();

    let rows: Vec<usize> =
        if m <= 256 { (0..m).collect() } else { (0..16).map(|i| i * (m / 16) + i % 7).collect() };
    let bias64: Vec<f64> = bias.iter().map(|v| v.to_f64()).collect();
    // The sampled rows' references, one thread each (the large shapes dominate the run).
    let reference: Vec<Vec<f64>> = std::thread::scope(|s| {
        let (a, b, bias) = (&a, &b, with_bias.then_some(&bias64[..]));
        let jobs: Vec<_> = rows
            .iter()
            .map(|&i| {
                s.spawn(move || gemm_reference(1, n, k, &a[i * k..(i + 1) * k], b, layout, bias))
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let mut want = Vec::new();
    let mut have = Vec::new();
    for (&i, row) in rows.iter().zip(&reference) {
        for j in 0..n {
            want.push(row[j] + beta as f64 * prior[i * n + j].to_f64());
            have.push(got[i * n + j]);
        }
    }
    let err = rel_err(&have, &want);
    assert!(
        err <= tol,
        "GEMM {m}x{n}x{k} {} -> {} {layout:?} bias={with_bias} beta={beta}: rel err {err:.3e} > {tol:.1e}",
        T::DTYPE,
        O::DTYPE
    );
}

#[test]
fn gemm_matches_f64_reference_on_odd_and_large_shapes() {
    let dev = require_gpu();
    let gemm = Gemm::new(&dev).unwrap();
    let shapes = [(1, 1, 1), (127, 255, 63), (1, 4096, 4096), (33, 100, 17), (4096, 4096, 4096)];
    let mut seed = 1;
    for &shape in &shapes {
        for layout in [BLayout::NK, BLayout::KN] {
            seed += 1;
            check_gemm::<bf16, bf16>(&dev, &gemm, shape, layout, false, 0.0, 1e-2, seed);
            check_gemm::<f16, f16>(&dev, &gemm, shape, layout, false, 0.0, 2e-3, seed);
            check_gemm::<bf16, f32>(&dev, &gemm, shape, layout, false, 0.0, 1e-5, seed);
        }
    }
}

#[test]
fn gemm_epilogues_bias_and_accumulate() {
    let dev = require_gpu();
    let gemm = Gemm::new(&dev).unwrap();
    for (i, &shape) in [(1, 1, 1), (127, 255, 63), (300, 1024, 512)].iter().enumerate() {
        let s = 100 + i as u64;
        check_gemm::<bf16, bf16>(&dev, &gemm, shape, BLayout::NK, true, 0.0, 1e-2, s);
        check_gemm::<f16, f16>(&dev, &gemm, shape, BLayout::NK, true, 0.0, 2e-3, s);
        check_gemm::<bf16, bf16>(&dev, &gemm, shape, BLayout::NK, false, 1.0, 1e-2, s);
        check_gemm::<bf16, f32>(&dev, &gemm, shape, BLayout::NK, true, 1.0, 1e-5, s);
    }
}

#[test]
fn gemm_rejects_mismatched_buffers() {
    let dev = require_gpu();
    let gemm = Gemm::new(&dev).unwrap();
    let a = dev.alloc_zeros::<bf16>(6).unwrap();
    let b = dev.alloc_zeros::<bf16>(6).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(4).unwrap();
    let bad_bias = dev.alloc_zeros::<bf16>(3).unwrap();
    // a is 2x3, b is 2x3 (N=2, K=3): out must be 2x2 = 4.
    assert!(gemm.matmul::<bf16, bf16>(2, 2, 3, &a, &b, BLayout::NK, None, 0.0, &mut out).is_ok());
    for (m, n, k) in [(3, 2, 3), (2, 3, 3), (2, 2, 2), (0, 2, 3)] {
        let r = gemm.matmul::<bf16, bf16>(m, n, k, &a, &b, BLayout::NK, None, 0.0, &mut out);
        assert!(matches!(r, Err(GpuError::Invalid(_))), "{m}x{n}x{k} accepted");
    }
    let r = gemm.matmul::<bf16, bf16>(2, 2, 3, &a, &b, BLayout::NK, Some(&bad_bias), 0.0, &mut out);
    assert!(matches!(r, Err(GpuError::Invalid(_))));
}

/// A stream capture on one thread survives context-wide calls of another thread (a
/// device opened and closed, pinned memory allocated and freed, a cuBLASLt handle made
/// and destroyed): they wait until the capture ends (`graph::outside_captures`) instead
/// of invalidating it, which once made a graph test fail with
/// `CUBLAS_STATUS_EXECUTION_FAILED` while a test beside it tore its backend down.
#[test]
fn captures_survive_other_threads_tearing_down() {
    let dev = require_gpu();
    let gemm = Gemm::new(&dev).unwrap();
    let (m, n, k) = (64, 96, 128);
    let mut rng = SmallRng::seed_from_u64(9);
    let (x, w): (Vec<bf16>, Vec<bf16>) = (random(&mut rng, m * k), random(&mut rng, n * k));
    let (dx, dw) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
    let mut eager = dev.alloc::<f32>(m * n).unwrap();
    let mut graphed = dev.alloc::<f32>(m * n).unwrap();
    graphed.fill_bytes(0xFF).unwrap();
    // Eager first: the algorithm is chosen outside the capture.
    gemm.matmul::<bf16, f32>(m, n, k, &dx, &dw, BLayout::NK, None, 0.0, &mut eager).unwrap();
    dev.synchronize().unwrap();
    let (began_tx, began_rx) = std::sync::mpsc::channel();
    let (ended, torn_down) = std::thread::scope(|s| {
        let other = s.spawn(move || {
            began_rx.recv().unwrap();
            let d = Device::open(0).unwrap();
            let staging = PinnedStaging::<i32>::new(&d, 1 << 20).unwrap();
            drop(staging);
            drop(Gemm::new(&d).unwrap());
            drop(d);
            Instant::now()
        });
        graph::begin_capture(&dev).unwrap();
        began_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // Nothing may panic between begin and end: the capture would never end.
        let recorded: Vec<_> = (0..3)
            .map(|_| {
                gemm.matmul::<bf16, f32>(m, n, k, &dx, &dw, BLayout::NK, None, 0.0, &mut graphed)
            })
            .collect();
        let ended = Instant::now();
        let g = graph::end_capture(&dev);
        recorded.into_iter().for_each(|r| r.unwrap());
        g.unwrap().launch().unwrap();
        dev.synchronize().unwrap();
        (ended, other.join().unwrap())
    });
    assert!(torn_down >= ended, "the other thread's calls waited for the capture");
    assert_eq!(graphed.to_vec().unwrap(), eager.to_vec().unwrap());
}
