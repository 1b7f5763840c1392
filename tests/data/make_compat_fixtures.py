"""Write the compatibility fixtures (run from the repository root with the nnh version to freeze):

    python tests/data/make_compat_fixtures.py tests/data/format_vN
"""
import sys
import warnings

import torch

sys.path.insert(0, "tests")
from gen_models import ScoreMLP, mixture_data
from models import MLP, classification_data
from torch.utils.data import TensorDataset

from nnh import NNHandler
from nnh.callbacks import EarlyStopping, LearningRateMonitor
from nnh.generative import VPSDE


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    h = NNHandler(MLP, hidden=8)
    h.set_optimizer(torch.optim.AdamW, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.functional.cross_entropy)
    h.set_train_loader(classification_data(48), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(16, seed=1), batch_size=16)
    h.add_callback(EarlyStopping(monitor="val_loss", patience=5))
    h.add_callback(LearningRateMonitor())
    h.train(2, ema_decay=0.9, progress_bar=False)
    h.save(f"{out}_classifier.pth")
    torch.manual_seed(0)
    g = NNHandler(ScoreMLP, model_type="score_based")
    g.set_sde(VPSDE)
    g.set_optimizer(torch.optim.Adam, lr=1e-3)
    g.set_train_loader(TensorDataset(mixture_data(64, seed=0)), batch_size=32)
    g.train(1, progress_bar=False)
    g.save(f"{out}_score.pth")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
