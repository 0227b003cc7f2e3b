//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`, which compiled Rust
//! calls and which no libc provides here.
//!
//! Written in assembly so the compiler cannot recognise a byte loop in them
//! and turn it back into a call to the function itself. They run in ring 3
//! only, natively, so `rep movsb`/`rep stosb` are both small and fast. The
//! System V ABI guarantees DF = 0 on entry.

core::arch::global_asm!(
    r#"
    .text
    .global memcpy
    .type memcpy, @function
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    .global memmove
    .type memmove, @function
memmove:
    mov rax, rdi
    mov rcx, rdx
    // Copy backwards only when the destination starts inside the source.
    mov r8, rdi
    sub r8, rsi
    cmp r8, rdx
    jb 2f
    rep movsb
    ret
2:
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret

    .global memset
    .type memset, @function
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memcmp
    .type memcmp, @function
    .global bcmp
    .type bcmp, @function
memcmp:
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 3f
4:
    movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz 3f
    inc rdi
    inc rsi
    dec rdx
    jnz 4b
3:
    ret

    // core's unwind tables name the personality routine even with
    // panic=abort; nothing ever unwinds here, so it is never called.
    .global rust_eh_personality
rust_eh_personality:
    ud2
"#
);
