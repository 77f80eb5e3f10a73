//! The step-wise scheduler on the smallest real model: prefix reuse, batch invariance, chunked
//! prefill that never stalls decoding, several choices, cancellation freeing blocks, embeddings.

mod common;

use edgelm_engine::{Event, FinishReason, Request, SamplingParams, Scheduler, SchedulerConfig};
use edgelm_kernels::Isa;
use edgelm_tokenizer::Encode;
use std::sync::mpsc::{channel, Receiver};

const MODEL: &str = "smollm2-135m-instruct";

fn scheduler(max_running: usize, prefix_cache: bool) -> Scheduler {
    let cfg = SchedulerConfig {
        n_ctx: 2048,
        max_running,
        max_waiting: 64,
        step_tokens: 256,
        kv_budget: None,
        prefix_cache,
        context_shift: None,
    };
    Scheduler::new(common::engine(MODEL, Isa::detect()), cfg).unwrap()
}

fn greedy_request(prompt: &[u32], max_tokens: usize) -> Request {
    let sampling = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    Request::new(prompt.to_vec(), max_tokens, sampling)
}

fn submit(s: &mut Scheduler, req: Request) -> Receiver<Event> {
    let (tx, rx) = channel();
    s.submit(req, Box::new(move |e: Event| tx.send(e).is_ok()))
        .unwrap();
    rx
}

/// Generated tokens of each choice, from a finished request's events.
fn tokens_of(rx: &Receiver<Event>) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for e in rx.try_iter() {
        if let Event::Token { choice, token, .. } = e {
            if out.len() <= choice {
                out.resize(choice + 1, Vec::new());
            }
            out[choice].push(token);
        }
    }
    out
}

fn encode(s: &Scheduler, text: &str) -> Vec<u32> {
    s.engine().tokenizer.encode(text, Encode::PROMPT).unwrap()
}

const SYSTEM: &str =
    "You are a careful assistant. Answer briefly and precisely, in plain English, \
    and never invent facts. If you do not know something, say so. ";

#[test]
fn a_prefix_hit_gives_the_same_greedy_text_and_skips_its_prefill() {
    let mut s = scheduler(4, true);
    let first = encode(
        &s,
        &format!("{SYSTEM}Question: what is the capital of France?"),
    );
    let second = encode(
        &s,
        &format!("{SYSTEM}Question: name three primary colours."),
    );
    let rx = submit(&mut s, greedy_request(&first, 24));
    s.run_until_idle().unwrap();
    tokens_of(&rx);
    let before = s.counters().reused_tokens;
    let rx = submit(&mut s, greedy_request(&second, 24));
    s.run_until_idle().unwrap();
    let with_hit = tokens_of(&rx);
    let reused = s.counters().reused_tokens - before;
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        reused as usize >= shared / 16 * 16 && reused > 0,
        "reused {reused} tokens of a {shared}-token common prefix"
    );
    let mut cold = scheduler(1, false);
    let rx = submit(&mut cold, greedy_request(&second, 24));
    cold.run_until_idle().unwrap();
    assert_eq!(
        with_hit,
        tokens_of(&rx),
        "greedy text with and without the prefix hit"
    );
}

/// Generated tokens with their log-probabilities and those of the top alternatives.
fn logprobs_of(rx: &Receiver<Event>) -> Vec<(u32, Vec<f32>)> {
    rx.try_iter()
        .filter_map(|e| match e {
            Event::Token {
                token,
                logprob: Some(lp),
                ..
            } => Some((
                token,
                std::iter::once(lp.logprob)
                    .chain(lp.top.iter().map(|t| t.1))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

/// Each of eight concurrent requests gets the greedy tokens it gets alone; the largest
/// log-probability difference between the two runs is printed (and bounded).
#[test]
fn concurrent_requests_get_what_they_get_alone() {
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "1, 2, 3, 4, 5,",
        "The three primary colours are",
        "SELECT name FROM users WHERE",
        "In 1492, Columbus",
        "Water boils at",
    ];
    let mut alone = Vec::new();
    let mut s = scheduler(8, false);
    for p in prompts {
        let ids = encode(&s, p);
        let mut req = greedy_request(&ids, 32);
        req.logprobs = Some(4);
        let rx = submit(&mut s, req);
        s.run_until_idle().unwrap();
        alone.push(logprobs_of(&rx));
    }
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let ids = encode(&s, p);
            let mut req = greedy_request(&ids, 32);
            req.logprobs = Some(4);
            submit(&mut s, req)
        })
        .collect();
    s.run_until_idle().unwrap();
    let mut worst = 0f32;
    for ((p, rx), want) in prompts.iter().zip(rxs).zip(alone) {
        let got = logprobs_of(&rx);
        let tokens = |v: &[(u32, Vec<f32>)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(tokens(&got), tokens(&want), "{p:?} among seven others");
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.1.iter().zip(&w.1) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    println!("largest log-probability difference, alone vs among eight: {worst:e}");
    assert!(
        worst < 0.05,
        "log-probabilities moved by {worst} in a batch"
    );
}

/// A long prompt arriving while another request decodes is prefilled in chunks; the decoding
/// request gets a token at every step meanwhile.
#[test]
fn a_long_prompt_never_stalls_a_decoding_request() {
    let mut s = scheduler(2, false);
    let short = encode(&s, "Count: one, two, three,");
    let rx_short = submit(&mut s, greedy_request(&short, 40));
    s.step().unwrap();
    assert_eq!(
        tokens_of(&rx_short).concat().len(),
        1,
        "prefill gives the first token"
    );
    let long_text = "The quick brown fox jumps over the lazy dog. ".repeat(120);
    let long = encode(&s, &long_text);
    assert!(long.len() > 3 * 256, "{} tokens", long.len());
    let rx_long = submit(&mut s, greedy_request(&long, 4));
    let mut long_steps = 0;
    while tokens_of(&rx_long).is_empty() {
        let n = s.step().unwrap();
        assert!(n <= 256, "a step computed {n} tokens, over its budget");
        assert_eq!(
            tokens_of(&rx_short).concat().len(),
            1,
            "the decoding request missed a step while the long prompt prefilled"
        );
        long_steps += 1;
    }
    assert!(
        long_steps >= long.len() / 256,
        "prefilled in {long_steps} steps"
    );
    s.run_until_idle().unwrap();
}

#[test]
fn choices_share_the_prompt_and_cancelled_requests_free_their_blocks() {
    let mut s = scheduler(4, false);
    let ids = encode(&s, "Write a short poem about the sea.");
    let mut req = greedy_request(&ids, 8);
    req.n = 3;
    req.sampling.temperature = 1.0;
    req.sampling.seed = 7;
    let rx = submit(&mut s, req);
    s.run_until_idle().unwrap();
    let mut done: Vec<usize> = rx
        .try_iter()
        .filter_map(|e| match e {
            Event::Done { choice, stats, .. } => {
                assert_eq!(stats.prompt_tokens, ids.len());
                Some(choice)
            }
            _ => None,
        })
        .collect();
    done.sort();
    assert_eq!(done, [0, 1, 2], "every choice ends once");
    assert_eq!(s.kv_stats().used, 0, "finished choices keep no blocks");

    // A client that goes away after two tokens: the next step drops it.
    let (tx, rx) = channel();
    let mut left = 2;
    let sink = move |e: Event| {
        let _ = tx.send(e);
        left -= 1;
        left > 0
    };
    s.submit(greedy_request(&ids, 100), Box::new(sink)).unwrap();
    for _ in 0..4 {
        s.step().unwrap();
    }
    assert!(s.is_idle(), "the cancelled request still runs");
    assert_eq!(
        s.kv_stats().used,
        0,
        "the cancelled request's blocks were not freed"
    );
    assert!(tokens_of(&rx).concat().len() <= 2);
}

/// The vector of a finished embedding request, which sends it and then `Done` (nothing else).
fn embedding_of(rx: &Receiver<Event>) -> Vec<f32> {
    let events: Vec<Event> = rx.try_iter().collect();
    match events.as_slice() {
        [Event::Embedding(v), Event::Done {
            reason: FinishReason::Stop,
            stats,
            ..
        }] => {
            assert_eq!(stats.generated_tokens, 0);
            assert_eq!(stats.reused_tokens, 0);
            v.clone()
        }
        other => panic!("an embedding request sent {other:?}"),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// An embedding is the same alone as beside generation requests in the same batches, even when
/// the prefix cache holds its prompt (reused positions have no hidden states: it must not
/// reuse them); it has unit length, and similar sentences are closer than unrelated ones.
#[test]
fn embeddings_are_batch_invariant_unit_length_and_meaningful() {
    let texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue rose 5% on strong sales.",
        "The lighthouse keeper climbed the spiral stairs every evening to light the lamp, \
         watching the ships pass the rocks of the northern cape while the storm gathered \
         over the grey and restless sea.",
    ];
    let mut s = scheduler(6, true);
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| encode(&s, t)).collect();
    assert!(ids[3].len() > 32, "the long text fills full blocks");
    let alone: Vec<Vec<f32>> = ids
        .iter()
        .map(|p| {
            let rx = submit(&mut s, Request::embedding(p.clone()));
            s.run_until_idle().unwrap();
            embedding_of(&rx)
        })
        .collect();
    assert_eq!(s.kv_stats().used, 0, "finished embeddings keep no blocks");

    // One request decodes while another prefills the long text into the prefix cache.
    let counting = encode(&s, "Count: one, two, three,");
    let rx_gen = submit(&mut s, greedy_request(&counting, 24));
    let rx_long = submit(&mut s, greedy_request(&ids[3], 16));
    while tokens_of(&rx_long).is_empty() {
        s.step().unwrap();
    }
    let reused = s.counters().reused_tokens;
    let rxs: Vec<_> = ids
        .iter()
        .map(|p| submit(&mut s, Request::embedding(p.clone())))
        .collect();
    let n = s.step().unwrap();
    assert!(
        n > ids.iter().map(Vec::len).sum::<usize>(),
        "the embeddings prefilled in one batch with the decode tokens ({n} tokens)"
    );
    assert_eq!(s.counters().reused_tokens, reused, "an embedding reused KV");
    s.run_until_idle().unwrap();
    assert!(tokens_of(&rx_gen).concat().len() > 1, "generation went on");

    let mut worst = (1f32, 0f32); // (lowest cosine, largest difference)
    for ((rx, want), text) in rxs.iter().zip(&alone).zip(texts) {
        let got = embedding_of(rx);
        assert_eq!(got.len(), s.engine().model.hp.n_embd);
        for v in [&got, want] {
            assert!(
                (dot(v, v).sqrt() - 1.0).abs() < 1e-4,
                "norm {}",
                dot(v, v).sqrt()
            );
        }
        let cosine = dot(&got, want);
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = (worst.0.min(cosine), worst.1.max(diff));
        assert!(
            cosine > 1.0 - 1e-4 && diff < 1e-3,
            "{text:?} beside other requests: cosine {cosine}, max difference {diff}"
        );
    }
    println!(
        "embedding alone vs batched: cosine ≥ {}, max difference {:e}",
        worst.0, worst.1
    );
    let (similar, unrelated) = (dot(&alone[0], &alone[1]), dot(&alone[0], &alone[2]));
    println!("cosine: similar sentences {similar}, unrelated {unrelated}");
    assert!(
        similar > unrelated + 0.05,
        "similar {similar} vs unrelated {unrelated}"
    );
    assert!(dot(&alone[1], &alone[2]) < similar);

    // The cache did hold the long text: a generation request reuses it.
    let before = s.counters().reused_tokens;
    let rx = submit(&mut s, greedy_request(&ids[3], 1));
    s.run_until_idle().unwrap();
    tokens_of(&rx);
    assert!(s.counters().reused_tokens > before, "nothing was cached");
}
