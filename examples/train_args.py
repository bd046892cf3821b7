"""Command-line arguments of examples/train_llama_cp.py (checked here: bad values exit with
argparse's message naming the flag)."""
import argparse


def parse_args(argv=None, description=None):
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--context_parallel_size", type=int, default=1)
    p.add_argument("--pipeline_parallel_size", type=int, default=1,
                   help="pipeline stages (decoder layers split in order; model.run_train)")
    p.add_argument("--num_microbatches", type=int, default=None,
                   help="microbatches per step with --pipeline_parallel_size > 1 (default: "
                        "the number of stages); --batch_size must divide by it")
    p.add_argument("--pipeline_schedule", choices=["1F1B", "GPipe"], default="1F1B")
    p.add_argument("--cp_comm_type", choices=["p2p", "all_gather", "a2a", "a2a+p2p"],
                   default="p2p")
    p.add_argument("--a2a_size", type=int, default=None,
                   help="a2a+p2p: all-to-all inside groups of this many CP ranks, ring across")
    p.add_argument("--load_balance", choices=["zigzag", "contiguous", "per_document"],
                   default="zigzag")
    p.add_argument("--packed", action="store_true",
                   help="pack whole documents (paragraphs) into each row; attention per document")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=1, help="sequences per DP rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", choices=["cpu", "cuda", "xla"], default="cpu")
    p.add_argument("--model_name_or_path", default=None, metavar="DIR",
                   help="Hugging Face checkpoint directory: config, weights and tokenizer")
    p.add_argument("--model_config", default=None,
                   help="JSON file of a transformers config, randomly initialised (default: a "
                        "tiny Llama) when there is no --model_name_or_path")
    p.add_argument("--dataset", nargs="+", default=None, metavar="FILE",
                   help="local JSON lines / JSON / parquet / CSV / text files or folders, read "
                        "with `datasets`, tokenized with --model_name_or_path's tokenizer")
    p.add_argument("--text_field", default="text", help="the documents' field in --dataset")
    p.add_argument("--text_unit", choices=["document", "paragraph", "line"],
                   default="document", help="one document per text file, paragraph or line")
    p.add_argument("--dataset_cache", default=None,
                   help="cache folder of `datasets` (default: ~/.cache/huggingface/datasets)")
    p.add_argument("--data", default=None,
                   help="text file read as bytes (default: the project's docs/*.md) when "
                        "there is no --dataset")
    p.add_argument("--save_hf", default=None, metavar="OUT",
                   help="export the trained model to OUT as a Hugging Face checkpoint")
    p.add_argument("--loss_log", default=None, metavar="FILE",
                   help="one record per logged step: CSV if FILE ends in .csv, else JSON lines")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each decoder layer in backward (large models)")
    p.add_argument("--vocab_parallel_logits", action="store_true",
                   help="keep logits split by vocabulary over TP; the loss is vocab-parallel")
    p.add_argument("--sequence_parallel", action="store_true",
                   help="sequence parallelism inside TP (norms / residuals on S/(cp*tp) tokens)")
    p.add_argument("--zero1", action="store_true",
                   help="ZeRO-1: AdamW's state sharded over DP x CP "
                        "(nxd_cp.initialize_parallel_optimizer; its step reduces and clips)")
    p.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the global gradient norm to this after the reduction (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--check", action="store_true",
                   help="compare loss and gradients of step 1 with the unmodified model")
    p.add_argument("--summary_json", default=None, help="write the run's figures here")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="linear learning-rate warm-up (a scheduler saved in checkpoints)")
    p.add_argument("--save_dir", default=None,
                   help="directory of sharded checkpoints (nxd_cp.save_checkpoint)")
    p.add_argument("--save_every", type=int, default=0,
                   help="save every N steps (0: only after the last step) when --save_dir")
    p.add_argument("--resume", nargs="?", const="newest", default=None, metavar="TAG",
                   help="continue from the newest checkpoint in --save_dir (or from TAG); "
                        "starts from scratch when there is none")
    args = p.parse_args(argv)
    if args.num_microbatches is None:
        args.num_microbatches = args.pipeline_parallel_size
    for name in ("tensor_parallel_size", "context_parallel_size", "pipeline_parallel_size",
                 "num_microbatches", "seq_len", "batch_size", "steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be >= 1")
    for name in ("save_every", "warmup_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name}={getattr(args, name)} must be >= 0")
    if (args.a2a_size is not None) != (args.cp_comm_type == "a2a+p2p"):
        p.error("--a2a_size goes with --cp_comm_type a2a+p2p, and only with it")
    if args.model_name_or_path and args.model_config:
        p.error("--model_config is for random initialisation: not with --model_name_or_path")
    if args.dataset and args.data:
        p.error("--data (bytes as tokens) and --dataset exclude each other")
    if args.dataset and not args.model_name_or_path:
        p.error("--dataset needs --model_name_or_path (its tokenizer)")
    if args.resume and not args.save_dir:
        p.error("--resume needs --save_dir (where the checkpoints are)")
    return args
