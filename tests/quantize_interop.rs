//! `edgelm quantize` and `edgelm imatrix` beside llama.cpp's own tools on the smallest real
//! model: our files load and score the same in llama.cpp, and each tool reads the other's
//! importance matrices in both formats. llama.cpp's binaries are built once from the
//! llama-cpp-python source package by bench/llamacpp.py (scripts/test.sh builds them first).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str = "smollm2-135m-instruct";

fn llama_tool(name: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/llamacpp.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(name)
        .output()
        .expect("running python3 bench/llamacpp.py");
    assert!(
        out.status.success(),
        "building llama.cpp's {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("the tool's path")
        .trim()
        .to_owned();
    PathBuf::from(path)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("starting the command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn edgelm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgelm"))
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgelm-quantize-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Calibration text: a Python standard library source, on every machine with python3.
fn calibration() -> PathBuf {
    let out =
        run(Command::new("python3").args(["-c", "import argparse; print(argparse.__file__)"]));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The first `bytes` of gpl-3.txt as the evaluation text.
fn evaluation(dir: &Path, bytes: usize) -> PathBuf {
    let text = std::fs::read_to_string(common::refs_dir().join("gpl-3.txt")).expect("gpl-3.txt");
    let cut = text
        .char_indices()
        .nth(bytes)
        .map_or(text.len(), |(i, _)| i);
    let path = dir.join("eval.txt");
    std::fs::write(&path, &text[..cut]).expect("write eval text");
    path
}

/// "PPL = 12.3456 +/- …" (edgelm) or "Final estimate: PPL = 12.3456 +/- …" (llama.cpp).
fn ppl_of(out: &Output) -> f64 {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let at = text
        .rfind("PPL = ")
        .unwrap_or_else(|| panic!("no PPL in:\n{text}"));
    text[at + 6..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad PPL in:\n{text}"))
}

/// Perplexity of `model` on `text` in chunks of 256 by edgelm and by llama-perplexity.
fn perplexities(model: &Path, text: &Path) -> (f64, f64) {
    let (m, f) = (model.to_string_lossy(), text.to_string_lossy());
    let ours = ppl_of(&run(edgelm().args([
        "perplexity",
        "-m",
        &m,
        "-f",
        &f,
        "-c",
        "256",
    ])));
    let theirs = ppl_of(&run(Command::new(llama_tool("llama-perplexity"))
        .args(["-m", &m, "-f", &f, "-c", "256", "-t", "2", "-b", "256"])));
    (ours, theirs)
}

#[test]
fn quantized_files_and_importance_matrices_interoperate_with_llama_cpp() {
    let source = common::model_path(MODEL);
    let dir = scratch();
    let (quantize, imatrix) = (llama_tool("llama-quantize"), llama_tool("llama-imatrix"));
    let calib = calibration();
    let eval = evaluation(&dir, 20_000);
    let s = |p: &Path| p.to_string_lossy().into_owned();

    // The lossless-enough F16 source both tools start from.
    let f16 = dir.join("f16.gguf");
    run(edgelm().args(["quantize", &s(&source), &s(&f16), "--type", "F16"]));

    // Our importance matrix, in both formats; llama.cpp's, in both formats.
    let ours = dir.join("ours.imatrix.gguf");
    let ours_dat = dir.join("ours.imatrix.dat");
    for out in [&ours, &ours_dat] {
        run(edgelm()
            .args(["imatrix", "-m", &s(&f16), "-f", &s(&calib), "-c", "256"])
            .args(["--chunks", "3", "-o", &s(out)]));
    }
    let theirs = dir.join("theirs.imatrix.gguf");
    let theirs_dat = dir.join("theirs.imatrix.dat");
    for (out, format) in [(&theirs, "gguf"), (&theirs_dat, "dat")] {
        run(Command::new(&imatrix)
            .args([
                "-m",
                &s(&f16),
                "-f",
                &s(&calib),
                "-c",
                "256",
                "--chunks",
                "3",
            ])
            .args(["-t", "2", "--output-format", format, "-o", &s(out)]));
    }

    // edgelm quantizes with each imatrix; llama.cpp with ours.
    let mut files = Vec::new();
    for (name, im) in [
        ("ours", &ours),
        ("ours-dat", &ours_dat),
        ("theirs", &theirs),
        ("theirs-dat", &theirs_dat),
    ] {
        let out = dir.join(format!("edgelm-q4_k_m-{name}.gguf"));
        run(edgelm().args([
            "quantize",
            &s(&f16),
            &s(&out),
            "--type",
            "Q4_K_M",
            "--imatrix",
            &s(im),
        ]));
        files.push(out);
    }
    // Error feedback from the calibration text changes values, not the format; quantized with
    // the moments held within `budget`, its log.
    let feedback = |out: &Path, budget: &str| {
        let o = run(edgelm()
            .args(["quantize", &s(&f16), &s(out), "--type", "Q4_0"])
            .args(["--imatrix", &s(&ours), "-f", &s(&calib), "-c", "256"])
            .args(["--chunks", "3", "--feedback-memory", budget]));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let fed = dir.join("edgelm-q4_0-feedback.gguf");
    let log = feedback(&fed, "1T");
    assert!(
        log.contains("rounded with error feedback") && !log.contains("passes"),
        "no matrix was fed back, or not in one pass: {log}"
    );
    // Under a memory budget a third of the moments' size the moments are collected a few
    // layers per pass, and the file is the same to the byte.
    let passes = dir.join("edgelm-q4_0-feedback-passes.gguf");
    let log = feedback(&passes, "140M");
    assert!(log.contains("collected in 3 passes"), "{log}");
    assert!(
        std::fs::read(&passes).expect("read") == std::fs::read(&fed).expect("read"),
        "the file quantized in passes differs from the one-pass file"
    );
    std::fs::remove_file(&passes).expect("cleanup");
    files.push(fed);
    for (name, im) in [("ours", &ours), ("ours-dat", &ours_dat)] {
        let out = dir.join(format!("llama-q4_k_m-{name}.gguf"));
        run(Command::new(&quantize).args(["--imatrix", &s(im), &s(&f16), &s(&out), "Q4_K_M", "2"]));
        files.push(out);
    }

    // Every file loads in both and scores the same text alike: same chunks, same tokens.
    for file in &files {
        let (ours, theirs) = perplexities(file, &eval);
        let ratio = ours / theirs;
        assert!(
            (ratio - 1.0).abs() < 0.01,
            "{}: edgelm PPL {ours}, llama.cpp PPL {theirs}",
            file.display()
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Structurally pruned models (fewer FFN neurons, fewer heads, fewer blocks) keep llama.cpp's
/// metadata conventions: llama-perplexity loads them and scores the same text as edgelm's
/// precise path does, within 1%, as edgelm's fast path does. Gemma 3
/// with block 9 dropped checks the per-layer sliding-window flags: its global layers 11 and 17
/// move to 10 and 16.
#[test]
fn pruned_models_score_alike_in_llama_cpp() {
    let dir = scratch().join("pruned");
    std::fs::create_dir_all(&dir).expect("dir");
    let eval = evaluation(&dir, 12_000);
    let calib = calibration();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    for (model, args) in [
        (
            MODEL,
            &[
                "--ffn-keep",
                "0.9",
                "--heads-keep",
                "6",
                "--drop-layers",
                "20",
            ][..],
        ),
        (
            "gemma3-270m",
            &["--drop-layers", "9", "--ffn-keep", "0.9"][..],
        ),
    ] {
        let source = common::model_path(model);
        let imatrix = dir.join(format!("{model}.imatrix.gguf"));
        run(edgelm()
            .args(["imatrix", "-m", &s(&source), "-f", &s(&calib), "-c", "256"])
            .args(["--chunks", "4", "-o", &s(&imatrix)]));
        let out = dir.join(format!("{model}-pruned.gguf"));
        run(edgelm()
            .args(["prune", "-m", &s(&source), "-o", &s(&out)])
            .args(["--imatrix", &s(&imatrix)])
            .args(args));
        let (ours, theirs) = perplexities(&out, &eval);
        // Each fast path against the reference (edgelm's precise path), not against each
        // other: on AVX2 the two sit on either side of it (SmolLM2: +0.6%, −0.5%). Misplaced
        // metadata in llama.cpp (a sliding flag on the wrong layer) costs far more than 1%.
        let exact = ppl_of(&run(edgelm()
            .args(["perplexity", "-m", &s(&out), "-f", &s(&eval)])
            .args(["-c", "256", "--precise"])));
        assert!(
            (ours / exact - 1.0).abs() < 0.01 && (theirs / exact - 1.0).abs() < 0.01,
            "{model} pruned ({args:?}): edgelm PPL {ours}, llama.cpp PPL {theirs}, precise {exact}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
