"""Pipeline parallelism (PP) with CP inside each stage.

``split``: which decoder layers a stage owns and the settings of ``pipeline_config``;
``stage``: the forward of one stage of a causal LM (``CausalLMStage``); ``engine``: one
training step over microbatches on ``torch.distributed.pipelining`` (the fallback), with the
gradient reduction of the step done once, as NxD's ``NxDPPModel`` does.
"""
