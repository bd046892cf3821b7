"""A compact XLA ``While`` loop over the leading dim of tensors, built from torch-xla's builder.

``while_scan(body, carry, xs, consts)`` runs ``body(carry, x, consts) -> (carry, ys)`` once per
index ``i`` of dim 0 of every ``xs``, stacking each ``ys`` on a new dim 0: the loop of
``attention/tile_loop.py``. It is torch-xla's ``experimental.scan`` forward
(``_scan_impl_flat``) without what a graph neuronx-cc compiles does not need:

- the trip counter and every slice index are ``s32`` (torch-xla's are ``s64``: 64-bit index
  arithmetic in every loop);
- ``consts`` (read-only inputs: K/V, masks) ride in the loop tuple untouched; they are not
  outputs of the body computation;
- the condition reads the counter only, the loop returns only ``carry`` and ``ys``, the body
  slices ``xs`` in their own shape (one index per dim, all but the first the same zero) and no
  input is multiplied by 1 (torch-xla's workaround for ``mark_sharding`` in a scanned body);
- the stacked ``ys`` buffers start as a broadcast of one element of the loop's first const (or
  x), not of a constant 0 (their slots are all overwritten): XLA merged the identical zero
  broadcasts of every loop of a graph and scheduled them first, so each was live from the
  graph's start (``zeros_after`` does the same for a zero carry). cp 8, S_local 8192, one
  layer's attention forward + backward: XLA:CPU peak 1,908 -> 1,757 MB (both changes).

The body is traced once on placeholder tensors into its own computation (a ``call`` in the
loop body). Tensors it reads besides its arguments must be device data (they become loop
inputs); a lazily computed closure would be traced into the body and recomputed every trip,
so pass it in ``consts``. Random numbers in the body are refused (every trip would draw the
same ones). torch-xla's builder and lowering internals are reached through
``nxd_cp.compat.torch_xla`` only; torch-xla is imported only when a loop is built.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

from torch import Tensor

from nxd_cp.compat import torch_xla as xla_compat

Body = Callable[[List[Tensor], List[Tensor], List[Tensor]], Tuple[List[Tensor], List[Tensor]]]


def _trace(body: Body, carry, xs, consts):
    """``body`` lowered on placeholders: its computation, the placeholder of every argument
    (carry, x, consts) and the lowering context (parameter ids)."""
    xb = xla_compat.builder()

    def placeholder(t: Tensor) -> Tensor:
        return xla_compat.placeholder_tensor(t.shape, t.dtype)

    fake = [[placeholder(t) for t in carry], [placeholder(x[0]) for x in xs],
            [placeholder(t) for t in consts]]
    carry_out, ys = body(list(fake[0]), list(fake[1]), list(fake[2]))
    carry_out, ys = list(carry_out), list(ys)
    for got, want in zip(carry_out, carry):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"the loop body changed a carry from {tuple(want.shape)} "
                             f"{want.dtype} to {tuple(got.shape)} {got.dtype}: a carry keeps "
                             "its shape and dtype")
    if len(carry_out) != len(carry):
        raise ValueError(f"the loop body returned {len(carry_out)} carries for {len(carry)}")
    ctx = xla_compat.lowering_context("LoopBody")
    ctx.build(carry_out + ys)
    if xla_compat.seed_info_id() in xla_compat.device_data_ids(carry_out + ys):
        raise RuntimeError("the loop body draws random numbers: every trip would draw the same")
    computation = xb.computation_from_module_proto("loop_body", ctx.hlo())
    return computation, fake, ctx, ys


def _first_elements(ops, xb):
    """f32 scalar: element 0 of the first op (a value that exists only once it does)."""
    rank = len(ops[0].shape().sizes)
    return ops[0].slice([0] * rank, [1] * rank).reshape([]).cast(xb.Type.F32)


def zeros_after(like: Tensor) -> Tensor:
    """Zeros of ``like``'s shape and dtype that XLA can only compute once ``like`` exists:
    ``like``'s first element times 0, broadcast (a loop's zero carry; a constant zero
    broadcast is merged with every other one of its shape and scheduled at the graph's start,
    live from there). The zeros are exact for finite ``like``."""
    return (like.reshape(-1)[:1] * 0).reshape([1] * like.dim()).expand(like.shape)


def while_scan(body: Body, carry: Sequence[Tensor], xs: Sequence[Tensor],
               consts: Sequence[Tensor] = ()) -> Tuple[List[Tensor], List[Tensor]]:
    """Run ``body`` over dim 0 of ``xs`` (at least one, all the same length ``n``) as one XLA
    ``While`` loop. Returns the final ``carry`` and the stacked ``ys`` (``[n, *y.shape]``)."""
    xb = xla_compat.builder()
    carry, xs, consts = list(carry), list(xs), list(consts)
    if not xs or len({x.shape[0] for x in xs}) != 1:
        raise ValueError(f"xs must be tensors of one leading length, got shapes "
                         f"{[tuple(x.shape) for x in xs]}")
    n = xs[0].shape[0]
    computation, fake, ctx, fake_ys = _trace(body, carry, xs, consts)

    # The loop tuple: counter, carry, consts, xs, ys buffers, hoisted device data; the counter
    # and the ys buffers are made inside the loop's computation, the rest are its inputs.
    inputs = carry + consts + xs
    slot = {}  # body-computation parameter id -> loop tuple index (carry, consts, hoisted)
    for i, t in enumerate(fake[0] + fake[2]):
        slot[ctx.tensor_parameter_id(t)] = 1 + i
    x_slot = {ctx.tensor_parameter_id(t): j for j, t in enumerate(fake[1])}  # -> xs index
    slot.pop(-1, None)  # arguments the body does not read
    x_slot.pop(-1, None)
    hoisted = ctx.device_parameter_id_tensor_mapping()
    for param in list(hoisted):
        if param in slot or param in x_slot:
            del hoisted[param]
    nc, nk, nx, ny = len(carry), len(consts), len(xs), len(fake_ys)
    for param, tensor in hoisted.items():
        slot[param] = 1 + len(inputs) + ny
        inputs.append(tensor.to(xs[0].device))

    builder = xb.create_builder("while_scan")
    params = [xb.mkparam(builder, i, xb.tensor_shape(t)) for i, t in enumerate(inputs)]
    # The ys buffers: every slot is written by its trip, so their first values do not matter;
    # built from one element of each loop input (not a constant: XLA would merge the identical
    # zero broadcasts of every loop and schedule them first, live from the graph's start).
    seed = _first_elements(params[nc:nc + nk] or params[nc + nk:nc + nk + nx], xb)
    buffers = [seed.cast(xb.Op.from_torch_type(y.dtype)).broadcast([n, *y.shape])
               for y in fake_ys]
    start = xb.Op.scalar(builder, 0, dtype=xb.Type.S32)
    loop_in = xb.Op.tuple([start] + params[:nc + nk + nx] + buffers + params[nc + nk + nx:])
    size = 1 + len(inputs) + ny

    def condition(state):
        counter = state.get_tuple_element(0)
        return counter < xb.Op.scalar(counter.builder(), n, dtype=xb.Type.S32)

    def step(state):
        elems = [state.get_tuple_element(k) for k in range(size)]
        i = elems[0]
        zero = xb.Op.scalar(i.builder(), 0, dtype=xb.Type.S32)
        x_base, y_base = 1 + nc + nk, 1 + nc + nk + nx
        args = {}
        for param in range(len(slot) + len(x_slot)):
            if param in x_slot:
                x = elems[x_base + x_slot[param]]
                sizes = list(x.shape().sizes)
                piece = x.dynamic_slice([i] + [zero] * (len(sizes) - 1), [1] + sizes[1:])
                args[param] = piece.reshape(sizes[1:])
            else:
                args[param] = elems[slot[param]]
        result = xb.Op.call(computation, [args[p] for p in range(len(args))])
        new = list(elems)
        new[0] = i + xb.Op.scalar(i.builder(), 1, dtype=xb.Type.S32)
        for c in range(nc):
            new[1 + c] = result.get_tuple_element(c)
        for j in range(ny):
            y = result.get_tuple_element(nc + j)
            sizes = list(y.shape().sizes)
            new[y_base + j] = elems[y_base + j].dynamic_update_slice(
                y.reshape([1] + sizes), [i] + [zero] * len(sizes))
        return xb.Op.tuple(new)

    loop_shape = loop_in.shape()
    loop = xb.mkop("While", (loop_in.op,),
                   condition_computation=xb.create_computation("Condition", condition,
                                                               [loop_shape]),
                   body_computation=xb.create_computation("Body", step, [loop_shape]))
    wanted = list(range(1, 1 + nc)) + list(range(1 + nc + nk + nx, 1 + nc + nk + nx + ny))
    root = xb.Op.tuple([loop.get_tuple_element(k) for k in wanted])
    outputs = xla_compat.user_computation("nxd_cp::while_scan", inputs,
                                          root.build("while_scan"))
    return list(outputs[:nc]), list(outputs[nc:])
