//! `bench decode`: paged decode attention (one query token per request) over shuffled
//! pages, timed with CUDA events, reported as achieved bandwidth beside a device-to-device
//! copy timed in the same run (the peer: what the memory system moves).
//!
//! With `--sparse-budget`, each case also runs sparse paging at those budgets: page
//! scoring and selection plus attention over the selected pages, timed together, beside
//! the dense kernel of the same run.

use clap::Args;
use half::{bf16, f16};
use radix_gpu::{DType, Device, HalfFloat, Jit, time_back_to_back, time_graph, time_runs};
use radix_kernels::attention::{AttentionBatch, AttentionShape, BatchMeta, KvSource};
use rand::{Rng, SeedableRng};

use super::{Measurement, upload_cycled, write_json};

#[derive(Args)]
pub struct DecodeArgs {
    /// Context lengths, one per request, as N@LEN (N requests of LEN tokens) or
    /// mixed:N:MIN:MAX (N requests, lengths log-uniform in MIN..MAX, fixed seed).
    /// Repeatable; default: the Llama-3-8B cases of the decode issue.
    #[arg(long = "case")]
    cases: Vec<String>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Blocks below which keys are split across SMs (default 2 × SMs).
    #[arg(long)]
    target_blocks: Option<usize>,
    /// Tiles for the dense decode (default: by rows), e.g. `ks,64,4` (key-split tiles of 64
    /// keys, 4 stages); see `bench attention --tiles`.
    #[arg(long, value_parser = radix_kernels::attention::TileConfig::parse)]
    tiles: Option<radix_kernels::attention::TileConfig>,
    /// With --back-to-back: then run the dense decode once more in a CUDA graph with the
    /// kernel that stamps its phases, and print where a launch's time goes.
    #[arg(long)]
    trace: bool,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Also time runs enqueued back to back (no host gap between them, as inside a CUDA
    /// graph), each over its own copy of the K/V pool so that copies together exceed the
    /// L2 cache (a step's layers never find their keys there either).
    #[arg(long)]
    back_to_back: bool,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Sparse paging budgets to time beside dense (fractions of pages, or token counts),
    /// e.g. `--sparse-budget 0.1,0.2,0.3,0.5`. Default cases then: 1@32768, 32@32768.
    #[arg(long, value_delimiter = ',')]
    sparse_budget: Vec<radix_kv::SparseBudget>,
    /// An FP8 (e4m3) K/V pool, scales 1, instead of 16-bit (`--kv-cache-dtype fp8_e4m3`):
    /// half the bytes per token read.
    #[arg(long)]
    kv_fp8: bool,
}

/// A K/V pool as the kernel reads it: 16-bit, or e4m3 bytes.
enum KvPools<T: radix_gpu::Element> {
    Half(radix_gpu::DeviceBuffer<T>, radix_gpu::DeviceBuffer<T>),
    Fp8(radix_gpu::DeviceBuffer<u8>, radix_gpu::DeviceBuffer<u8>),
}

impl<T: HalfFloat> KvPools<T> {
    fn run(
        &self,
        batch: &AttentionBatch,
        jit: &Jit,
        q: &radix_gpu::DeviceBuffer<T>,
        o: &mut radix_gpu::DeviceBuffer<T>,
    ) -> radix_gpu::Result<()> {
        match self {
            KvPools::Half(k, v) => batch.run(jit, q, k, v, o, None),
            KvPools::Fp8(k, v) => {
                let scales = radix_kernels::attention::KvFp8Scales { k: 1.0, v: 1.0 };
                batch.run_fp8(jit, q, k, v, scales, o, None)
            }
        }
    }
}

fn parse_case(s: &str) -> anyhow::Result<Vec<usize>> {
    let bad = || anyhow::anyhow!("bad case {s:?}: expected N@LEN or mixed:N:MIN:MAX");
    if let Some(rest) = s.strip_prefix("mixed:") {
        let v: Vec<usize> =
            rest.split(':').map(|x| x.parse()).collect::<Result<_, _>>().map_err(|_| bad())?;
        let [n, lo, hi] = v[..] else { return Err(bad()) };
        anyhow::ensure!(n > 0 && lo > 0 && hi >= lo, bad());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        return Ok((0..n).map(|_| rng.random_range(a..=b).exp().round() as usize).collect());
    }
    let (n, len) = s.split_once('@').ok_or_else(bad)?;
    let (n, len): (usize, usize) = (n.parse().map_err(|_| bad())?, len.parse().map_err(|_| bad())?);
    anyhow::ensure!(n > 0 && len > 0, bad());
    Ok(vec![len; n])
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    match args.dtype {
        DType::F16 => run_typed::<f16>(&args),
        DType::BF16 => run_typed::<bf16>(&args),
        other => anyhow::bail!("bench decode takes f16 or bf16, not {other}"),
    }
}

/// Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers.
pub fn copy_bandwidth(device: &Device) -> anyhow::Result<f64> {
    let n = 1usize << 30;
    let src = device.alloc_zeros::<u8>(n)?;
    let mut dst = device.alloc_zeros::<u8>(n)?;
    let t = time_runs(device, 3, 20, |_| dst.copy_from_device(&src))?;
    Ok(2.0 * n as f64 / (t.median_ms * 1e-3))
}

fn run_typed<T: HalfFloat>(a: &DecodeArgs) -> anyhow::Result<()> {
    let defaults: &[&str] = if a.sparse_budget.is_empty() {
        &["64@4096", "256@1024", "1@65536", "mixed:16:512:32768"]
    } else {
        &["1@32768", "32@32768"]
    };
    let cases: Vec<(String, Vec<usize>)> = if a.cases.is_empty() {
        defaults
            .iter()
            .map(|c| Ok((c.to_string(), parse_case(c)?)))
            .collect::<anyhow::Result<_>>()?
    } else {
        a.cases.iter().map(|c| Ok((c.clone(), parse_case(c)?))).collect::<anyhow::Result<_>>()?
    };
    anyhow::ensure!(
        !a.kv_fp8 || a.sparse_budget.is_empty(),
        "--kv-fp8 times dense decode only (no --sparse-budget)"
    );
    let device = Device::open(0)?;
    let jit = Jit::with_default_cache();
    let copy_bw = copy_bandwidth(&device)?;
    // e4m3 bytes of values in about -2..2 (no NaN): the timing does not depend on them.
    let byte_block: Vec<u8> =
        (0..(1usize << 24)).map(|i| [0x30u8, 0xb8, 0x3c, 0xc0, 0x28, 0xa4][i % 6]).collect();
    println!("device-to-device copy: {:.0} GB/s (read + write)", copy_bw / 1e9);
    let (hq, hkv, d, ps) = (a.heads, a.kv_heads, a.head_dim, a.page_size);
    // (Planned as the engine plans a pool of that kind: FP8 pools get their own tiles.)
    let shape = AttentionShape::new(hq, hkv, d, true).with_fp8_kv(a.kv_fp8);
    let mut rows = Vec::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    for (name, lens) in cases {
        let b = lens.len();
        let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
        let num_pages: usize = pages.iter().sum();
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rng);
        let mut indptr = vec![0i32];
        for p in &pages {
            indptr.push(indptr.last().unwrap() + *p as i32);
        }
        let last: Vec<i32> =
            lens.iter().zip(&pages).map(|(l, p)| (l - (p - 1) * ps) as i32).collect();
        let kv = KvSource::Paged {
            page_size: ps,
            num_pages,
            kv_indptr: indptr,
            kv_indices: ids,
            kv_last_page_len: last,
            head_tables: false,
        };
        let meta = BatchMeta::new((0..=b as i32).collect(), kv, true)?;
        let pool = num_pages * hkv * ps * d;
        // Random values, a 16M-element block repeated for large pools (the timing does not
        // depend on them; generating gigabytes on the host would).
        let block: Vec<T> =
            (0..(1usize << 24)).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect();
        let random = |len: usize| upload_cycled(&device, &block, len);
        let pools = || -> anyhow::Result<KvPools<T>> {
            Ok(if a.kv_fp8 {
                let bytes = |len| upload_cycled(&device, &byte_block, len);
                KvPools::Fp8(bytes(pool)?, bytes(pool)?)
            } else {
                KvPools::Half(random(pool)?, random(pool)?)
            })
        };
        let q = random(b * hq * d)?;
        let kv_pools = pools()?;
        let mut o = device.alloc::<T>(b * hq * d)?;
        let sparse_meta = (!a.sparse_budget.is_empty()).then(|| meta.clone());
        let mut batch =
            AttentionBatch::with_options(&device, shape, meta, a.tiles, a.target_blocks)?;
        let t = time_runs(&device, a.warmup, a.runs, |_| kv_pools.run(&batch, &jit, &q, &mut o))?;
        let tokens: usize = lens.iter().sum();
        let kv_elem_bytes = if a.kv_fp8 { 1 } else { 2 };
        let bytes = 2 * tokens * hkv * d * kv_elem_bytes + 2 * b * hq * d * 2;
        let bw = bytes as f64 / (t.median_ms * 1e-3);
        let kv_label = if a.kv_fp8 { " kv=fp8" } else { "" };
        let label = format!("{name} Hq={hq} Hkv={hkv} D={d} page={ps} {}{kv_label}", T::DTYPE);
        let work = batch.work();
        let split_tiles = work.merge.len() / hkv;
        println!(
            "{label}: {:.1} us, {:.0} GB/s = {:.1}% of copy, {} blocks, {split_tiles} split query tiles",
            t.median_ms * 1e3,
            bw / 1e9,
            100.0 * bw / copy_bw,
            work.work.len() * hkv,
        );
        let b2b_ms = if a.back_to_back {
            // Enough pool copies to exceed the L2 cache (50 MB on the H100/H200) fourfold.
            let copies = (256usize << 20).div_ceil(2 * pool * kv_elem_bytes).clamp(1, 16);
            let extra: Vec<_> = (1..copies).map(|_| pools()).collect::<anyhow::Result<_>>()?;
            // Run i reads copy i % copies of the pool.
            let pool_copy = |i: usize| match i % copies {
                0 => &kv_pools,
                c => &extra[c - 1],
            };
            let t = time_back_to_back(&device, a.warmup, 5, a.runs, |i| {
                pool_copy(i).run(&batch, &jit, &q, &mut o)
            })?;
            let bw = bytes as f64 / (t.median_ms * 1e-3);
            println!(
                "{label} back to back ({copies} pool copies): {:.1} us, {:.0} GB/s = {:.1}% of copy",
                t.median_ms * 1e3,
                bw / 1e9,
                100.0 * bw / copy_bw
            );
            // In a CUDA graph, as the engine's decode runs it (64 runs a graph).
            let g = time_graph(&device, 3, a.runs.clamp(5, 20), 64, |i| {
                pool_copy(i).run(&batch, &jit, &q, &mut o)
            })?;
            let gbw = bytes as f64 / (g.median_ms * 1e-3);
            println!(
                "{label} in a CUDA graph: {:.1} us, {:.0} GB/s = {:.1}% of copy",
                g.median_ms * 1e3,
                gbw / 1e9,
                100.0 * gbw / copy_bw
            );
            if a.trace && !a.kv_fp8 {
                batch.enable_trace()?;
                time_graph(&device, 3, 5, 64, |i| pool_copy(i).run(&batch, &jit, &q, &mut o))?;
                if let Some(stamps) = batch.read_trace()? {
                    super::decode_trace::print_trace(&label, &stamps, device.info().clock_mhz);
                }
            }
            Some((t.median_ms, g.median_ms))
        } else {
            None
        };
        let graph_ms = b2b_ms.map(|(_, g)| g);
        let b2b_ms = b2b_ms.map(|(t, _)| t);
        rows.push(Measurement {
            benchmark: "attention_decode".into(),
            shape: label.clone(),
            ours: bw / 1e9,
            unit: "GB/s".into(),
            median_ms: t.median_ms,
            device: device.info().name.clone(),
            extra: Some(serde_json::json!({
                "median_us": t.median_ms * 1e3,
                "copy_gbps": copy_bw / 1e9,
                "fraction_of_copy": bw / copy_bw,
                "kv_tokens": tokens,
                "back_to_back_us": b2b_ms.map(|ms| ms * 1e3),
                "back_to_back_fraction_of_copy":
                    b2b_ms.map(|ms| bytes as f64 / (ms * 1e-3) / copy_bw),
                "graph_us": graph_ms.map(|ms| ms * 1e3),
                "graph_fraction_of_copy": graph_ms.map(|ms| bytes as f64 / (ms * 1e-3) / copy_bw),
            })),
        });
        if let (Some(meta), KvPools::Half(k, v)) = (sparse_meta, &kv_pools) {
            let bounds = random_bounds(&device, num_pages * hkv, d)?;
            for &budget in &a.sparse_budget {
                let dense_us = t.median_ms * 1e3;
                let copies =
                    SparseCopies { make_pool: &|| Ok((random(pool)?, random(pool)?)), pool };
                let row = time_sparse(
                    &device, &jit, a, &meta, budget, &q, k, v, &bounds, &mut o, &copies, &batch,
                )?;
                let Some(st) = row else {
                    println!("{label} sparse {budget}: dense at this budget (nothing to select)");
                    continue;
                };
                let us = st.us;
                let selection = match (st.fused_us, st.cluster) {
                    (Some(f), Some(c)) => format!(
                        "one launch (clusters of {c}) {f:.1} us; two kernels: scoring {:.1} us, \
                         selection {:.1} us",
                        st.score_us, st.pick_us
                    ),
                    _ => format!("scoring {:.1} us, selection {:.1} us", st.score_us, st.pick_us),
                };
                println!(
                    "{label} sparse {budget}: {us:.1} us with selection (keeps {:.1}% of pages; \
                     alone: {selection}, attention {:.1} us) vs dense {dense_us:.1} us: {:.2}x",
                    100.0 * st.kept_fraction,
                    st.attention_us,
                    dense_us / us
                );
                if let Some(g) = &st.graphs {
                    println!(
                        "{label} sparse {budget} in a CUDA graph: {:.1} us (alone: selection \
                         {:.1} us, attention {:.1} us; with the two-kernel selection {:.1} us) \
                         vs dense {:.1} us: {:.2}x ({:.2}x with two kernels)",
                        g.sparse_us,
                        g.select_us,
                        g.attention_us,
                        g.split_us,
                        g.dense_us,
                        g.dense_us / g.sparse_us,
                        g.dense_us / g.split_us
                    );
                }
                rows.push(Measurement {
                    benchmark: "attention_decode_sparse".into(),
                    shape: format!("{label} budget={budget}"),
                    ours: us,
                    unit: "us".into(),
                    median_ms: us * 1e-3,
                    device: device.info().name.clone(),
                    extra: Some(serde_json::json!({
                        "dense_us": dense_us,
                        "speedup": dense_us / us,
                        "pages_kept_fraction": st.kept_fraction,
                        "score_us": st.score_us,
                        "select_us": st.pick_us,
                        "fused_select_us": st.fused_us,
                        "fused_cluster": st.cluster,
                        "attention_us": st.attention_us,
                        "graph_us": st.graphs.as_ref().map(|g| g.sparse_us),
                        "graph_two_kernel_us": st.graphs.as_ref().map(|g| g.split_us),
                        "graph_select_us": st.graphs.as_ref().map(|g| g.select_us),
                        "graph_attention_us": st.graphs.as_ref().map(|g| g.attention_us),
                        "graph_dense_us": st.graphs.as_ref().map(|g| g.dense_us),
                        "graph_speedup": st.graphs.as_ref().map(|g| g.dense_us / g.sparse_us),
                    })),
                });
            }
        }
    }
    write_json(a.json.as_ref(), &rows)
}

/// Median times of one sparse decode attention.
struct SparseTiming {
    /// Selection (the engine's path) and attention together, each run timed with its own
    /// pair of events.
    us: f64,
    /// The two-kernel selection's parts.
    score_us: f64,
    pick_us: f64,
    /// The one-launch selection and its cluster size, where the engine's path takes it.
    fused_us: Option<f64>,
    cluster: Option<u32>,
    attention_us: f64,
    /// In CUDA graphs (`--back-to-back`).
    graphs: Option<GraphTiming>,
    kept_fraction: f64,
}

/// Sparse and dense decode attention timed in CUDA graphs, as the engine runs them, over
/// copies of the pool and bounds that together exceed the L2 (microseconds a run).
struct GraphTiming {
    /// Selection (the engine's path) and attention.
    sparse_us: f64,
    /// The same with the two-kernel selection.
    split_us: f64,
    /// The parts alone.
    select_us: f64,
    attention_us: f64,
    /// Dense attention over the whole pool.
    dense_us: f64,
}

/// What `time_sparse` needs to build copies of the K/V pool for back-to-back runs.
struct SparseCopies<'a, T: radix_gpu::Element> {
    #[allow(clippy::type_complexity)]
    make_pool:
        &'a dyn Fn() -> anyhow::Result<(radix_gpu::DeviceBuffer<T>, radix_gpu::DeviceBuffer<T>)>,
    /// Elements of one K (or V) pool.
    pool: usize,
}

/// Times page scoring + selection + attention over the selected pages for `budget`,
/// with the default sparse policy (1 sink page, 2 window pages). Returns the median
/// microseconds and the fraction of pages kept, or `None` if every sequence stays dense.
#[allow(clippy::too_many_arguments)]
fn time_sparse<T: HalfFloat>(
    device: &Device,
    jit: &Jit,
    a: &DecodeArgs,
    meta: &BatchMeta,
    budget: radix_kv::SparseBudget,
    q: &radix_gpu::DeviceBuffer<T>,
    k: &radix_gpu::DeviceBuffer<T>,
    v: &radix_gpu::DeviceBuffer<T>,
    bounds: &radix_gpu::DeviceBuffer<u8>,
    o: &mut radix_gpu::DeviceBuffer<T>,
    copies: &SparseCopies<'_, T>,
    dense: &AttentionBatch,
) -> anyhow::Result<Option<SparseTiming>> {
    use radix_kernels::sparse::{
        SelectBuffers, SelectPath, SelectSizes, SparseShape, Stages, auto_cluster, select,
        select_stages, select_with, sparse_meta,
    };
    let KvSource::Paged { kv_indptr, kv_indices, kv_last_page_len, num_pages, .. } = &meta.kv
    else {
        anyhow::bail!("sparse paging needs a paged batch");
    };
    let policy = radix_kv::SparsePolicy::default();
    let keep: Vec<i32> = meta
        .kv_lens
        .iter()
        .map(|&l| policy.pages_to_keep(budget, l, a.page_size).unwrap_or(0) as i32)
        .collect();
    if keep.iter().all(|&k| k == 0) {
        return Ok(None);
    }
    let sshape = SparseShape {
        num_qo_heads: a.heads,
        num_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        sink_pages: policy.sink_pages,
        window_pages: policy.window_pages,
    };
    // The attention batch over the per-head tables the selection writes.
    let smeta = sparse_meta(
        &sshape,
        &meta.qo_indptr,
        kv_indptr,
        kv_last_page_len,
        &keep,
        a.page_size,
        *num_pages,
    )?;
    let KvSource::Paged { kv_indptr: indptr, .. } = &smeta.kv else {
        unreachable!("sparse_meta builds a paged batch")
    };
    let entries = *indptr.last().unwrap() as usize;
    let batch = keep.len();
    let mut bufs = SelectBuffers {
        qo_indptr: device.upload(&meta.qo_indptr)?,
        kv_indptr: device.upload(kv_indptr)?,
        kv_indices: device.upload(kv_indices)?,
        keep: device.upload(&keep)?,
        out_indptr: device.upload(indptr)?,
        out_indices: device.alloc(entries)?,
        scores: device.alloc(kv_indices.len() * a.kv_heads)?,
    };
    let sizes = SelectSizes { batch, dense_pages: kv_indices.len(), sparse_entries: entries };
    let shape = AttentionShape::new(a.heads, a.kv_heads, a.head_dim, true);
    let (tiles, plan) =
        radix_kernels::attention::plan_batch(device, &shape, &smeta, None, a.target_blocks)?;
    let partial = plan.partial_rows * a.heads;
    // SAFETY: a view of the selection's output, which outlives the batch below.
    let tables = unsafe { bufs.out_indices.view(0, entries) }?;
    let buffers = radix_kernels::attention::AttentionBuffers {
        qo_indptr: device.upload(&meta.qo_indptr)?,
        kv_indptr: device.upload(indptr)?,
        kv_indices: tables,
        kv_last_page_len: device.upload(kv_last_page_len)?,
        work: device.upload(&plan.work_words().collect::<Vec<_>>())?,
        merge: device.upload(&plan.merge_words().collect::<Vec<_>>())?,
        partial_o: device.alloc(partial.max(1) * a.head_dim)?,
        partial_lse: device.alloc(partial.max(1))?,
    };
    let sparse = AttentionBatch::from_parts(device, shape, smeta, tiles, plan, buffers)?;
    let t = time_runs(device, a.warmup, a.runs, |_| {
        select(jit, &sshape, &sizes, q, bounds, &mut bufs)?;
        sparse.run(jit, q, k, v, o, None)
    })?;
    // The parts alone: scoring, selection, and attention over the selected pages.
    let mut stage = |stages| {
        time_runs(device, a.warmup, a.runs, |_| {
            select_stages(jit, &sshape, &sizes, q, bounds, &mut bufs, stages)
        })
    };
    let t_score = stage(Stages::Score)?;
    let t_pick = stage(Stages::Pick)?;
    let cluster = auto_cluster::<T>(jit, device, &sshape, batch);
    let fit = radix_kernels::sparse::cluster_fit::<T>(jit, device, &sshape)?;
    if !fit.is_empty() {
        let fit: Vec<String> = fit.iter().map(|(c, n)| format!("{n} of {c}")).collect();
        println!("one-launch selection: clusters at once {}", fit.join(", "));
    }
    let fused_us = match cluster {
        Some(c) => Some(
            time_runs(device, a.warmup, a.runs, |_| {
                select_with(jit, &sshape, &sizes, q, bounds, &mut bufs, SelectPath::Fused(c))
            })?
            .median_ms
                * 1e3,
        ),
        None => None,
    };
    let t_attn = time_runs(device, a.warmup, a.runs, |_| sparse.run(jit, q, k, v, o, None))?;
    let kept: usize = keep
        .iter()
        .zip(&meta.kv_lens)
        .map(|(&k, &l)| if k > 0 { k as usize } else { l.div_ceil(a.page_size) })
        .sum();
    let total: usize = meta.kv_lens.iter().map(|l| l.div_ceil(a.page_size)).sum();
    let kept_fraction = kept as f64 / total as f64;
    let mut graphs = None;
    if a.back_to_back {
        // Copies of the pool so that the kept pages of all of them exceed the L2 fourfold,
        // and of the bounds likewise (a step's layers find neither in the L2).
        let kept_bytes = (2.0 * copies.pool as f64 * 2.0 * kept_fraction) as usize;
        let n_pools = (256usize << 20).div_ceil(kept_bytes.max(1)).clamp(1, 16);
        let extra_pools: Vec<_> =
            (1..n_pools).map(|_| (copies.make_pool)()).collect::<anyhow::Result<_>>()?;
        let pools: Vec<_> =
            std::iter::once((k, v)).chain(extra_pools.iter().map(|(k, v)| (k, v))).collect();
        let n_bounds = (256usize << 20).div_ceil(bounds.len().max(1)).clamp(1, 64);
        let mut extra_bounds = Vec::new();
        for _ in 1..n_bounds {
            let mut c = device.alloc::<u8>(bounds.len())?;
            c.copy_from_device(bounds)?;
            extra_bounds.push(c);
        }
        let bound_copies: Vec<_> = std::iter::once(bounds).chain(extra_bounds.iter()).collect();
        // Each timed as the engine runs it: in a CUDA graph (64 runs a graph, pool and
        // bounds copies in turn).
        let per_graph = 64;
        let graph = |f: &mut dyn FnMut(usize) -> radix_gpu::Result<()>| {
            time_graph(device, 3, a.runs.clamp(5, 20), per_graph, f).map(|t| t.median_ms * 1e3)
        };
        let mut both = |path| {
            graph(&mut |i| {
                let (k, v) = pools[i % pools.len()];
                let bnd = bound_copies[i % bound_copies.len()];
                select_with(jit, &sshape, &sizes, q, bnd, &mut bufs, path)?;
                sparse.run(jit, q, k, v, o, None)
            })
        };
        let sparse_us = both(SelectPath::Auto)?;
        let split_us = both(SelectPath::Split)?;
        let select_us = graph(&mut |i| {
            let bnd = bound_copies[i % bound_copies.len()];
            select(jit, &sshape, &sizes, q, bnd, &mut bufs)
        })?;
        let attention_us = graph(&mut |i| {
            let (k, v) = pools[i % pools.len()];
            sparse.run(jit, q, k, v, o, None)
        })?;
        let dense_us = graph(&mut |i| {
            let (k, v) = pools[i % pools.len()];
            dense.run(jit, q, k, v, o, None)
        })?;
        graphs = Some(GraphTiming { sparse_us, split_us, select_us, attention_us, dense_us });
    }
    Ok(Some(SparseTiming {
        us: t.median_ms * 1e3,
        score_us: t_score.median_ms * 1e3,
        pick_us: t_pick.median_ms * 1e3,
        fused_us,
        cluster,
        attention_us: t_attn.median_ms * 1e3,
        graphs,
        kept_fraction,
    }))
}

/// `records` key-bounds records (`kv_append::bounds`) of random pages (timing only: they
/// need not match the pool's keys). A few thousand distinct records, repeated.
fn random_bounds(
    device: &Device,
    records: usize,
    head_dim: usize,
) -> anyhow::Result<radix_gpu::DeviceBuffer<u8>> {
    use radix_kernels::kv_append::bounds;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let bytes = radix_kv::bounds_record_bytes(head_dim);
    let mut block = vec![0u8; 4096 * bytes];
    for rec in block.chunks_mut(bytes) {
        let lo: Vec<f32> = (0..head_dim).map(|_| rng.random_range(-2.0..1.0)).collect();
        let hi: Vec<f32> = lo.iter().map(|l| l + rng.random_range(0.0..1.0)).collect();
        bounds::encode(&lo, &hi, rec);
    }
    upload_cycled(device, &block, records * bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cases() {
        assert_eq!(parse_case("2@10").unwrap(), vec![10, 10]);
        let mixed = parse_case("mixed:16:512:32768").unwrap();
        assert_eq!(mixed.len(), 16);
        assert!(mixed.iter().all(|&l| (512..=32768).contains(&l)));
        assert!(parse_case("x@1").is_err() && parse_case("mixed:1:5:2").is_err());
    }
}
