"""Training the Q-Former: the paper's two stages, one process or many (torchrun).

- stage1.py: ITC, ITM with hard negatives, ITG (`Blip2ForQFormerPretraining`, `Stage1Objective`)
- stage2.py: the language-modelling loss through a frozen OPT or T5 (`Stage2Objective`)
- losses.py: the losses as functions of tensors
- frozen.py: freezing, and the cache of frozen image-encoder features
- data.py: datasets, collates, resumable sharded batch order
- loop.py: the trainer (`Trainer`, `TrainConfig`)
- distributed.py: torchrun set-up and the gathers the losses need
- recipes.py, cli.py: `blip2 train stage1|stage2 --config FILE`
"""
