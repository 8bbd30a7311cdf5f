"""The step timer the TRL scripts of the benches share (they run as text in TRL's own venv): top-level code to put
after `import time, torch` and `from transformers import TrainerCallback`. `StepTimer()` goes in the trainer's
callbacks; `step_times()` then gives each optimizer step's wall time (GPU work synchronised at both ends)."""

STEP_TIMER = '''
stamps = []
class StepTimer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        stamps.append(["b", time.perf_counter()])
    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        stamps.append(["e", time.perf_counter()])
def step_times():
    begins = [t for k, t in stamps if k == "b"]; ends = [t for k, t in stamps if k == "e"]
    return [e - b for b, e in zip(begins, ends)]
'''
