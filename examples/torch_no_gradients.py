"""A PyTorch classifier whose "confidence" head trains through argmax, and a layer that is
never called: `gradwatch doctor examples/torch_no_gradients.py` explains both."""

import torch


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(16, 32)
        self.classes = torch.nn.Linear(32, 4)
        self.confidence = torch.nn.Linear(32, 4)
        self.unused_projection = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.classes(h), self.confidence(h)


model = Classifier()
optimizer = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
for _ in range(3):
    optimizer.zero_grad()
    logits, confidence = model(x)
    agreement = (confidence.argmax(1) == y).float().mean()  # argmax: no gradient
    loss = torch.nn.functional.cross_entropy(logits, y) + (1 - agreement)
    loss.backward()
    optimizer.step()
