;; The module kernel/tests/wasm.rs loads: calls, memory, SSE4.1 floats, and one trap per vector.
(module
  (memory (export "memory") 1 4)
  (func (export "add") (param i32 i32) (result i32)
    local.get 0
    local.get 1
    i32.add)
  ;; Recursion: n! (wasm calls wasm).
  (func $fac (export "fac") (param i64) (result i64)
    local.get 0
    i64.const 2
    i64.lt_u
    if (result i64)
      i64.const 1
    else
      local.get 0
      local.get 0
      i64.const 1
      i64.sub
      call $fac
      i64.mul
    end)
  (func (export "store") (param i32 i32)
    local.get 0
    local.get 1
    i32.store)
  ;; An out-of-bounds address faults (#PF) in the memory's guard: wasmtime's HeapOutOfBounds.
  (func (export "load") (param i32) (result i32)
    local.get 0
    i32.load)
  ;; ud2 (#UD): wasmtime's UnreachableCodeReached.
  (func (export "unreachable")
    unreachable)
  ;; Signed division: Cranelift tests the divisor for zero (ud2, #UD: IntegerDivisionByZero), and
  ;; idiv itself raises #DE for INT_MIN / -1 (IntegerOverflow).
  (func (export "div_s") (param i32 i32) (result i32)
    local.get 0
    local.get 1
    i32.div_s)
  ;; Unsigned division: div raises #DE for a zero divisor (IntegerDivisionByZero).
  (func (export "div_u") (param i32 i32) (result i32)
    local.get 0
    local.get 1
    i32.div_u)
  ;; roundsd (SSE4.1): round half to even.
  (func (export "nearest") (param f64) (result f64)
    local.get 0
    f64.nearest)
  (func (export "grow") (param i32) (result i32)
    local.get 0
    memory.grow)
  ;; Unbounded recursion: wasmtime's stack check (StackOverflow).
  (func $deep (export "deep") (param i32) (result i32)
    local.get 0
    i32.const 1
    i32.add
    call $deep))
