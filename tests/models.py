"""Hand-written models, one per op rule (or family of rules), used by the tests."""
import torch
import torch.nn.functional as F
from torch import nn

from dgating_surgery.demo import DigitsMLP


class MLP(DigitsMLP):
    """The demo's three-layer MLP at test size."""

    def __init__(self, n_in=10, hidden=(20, 15), n_out=5):
        super().__init__(n_in, hidden, n_out)


def conv_bn(cin, cout, k=3, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    """Residual adds: the stream's channels are one group across every contributor."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.a = nn.Sequential(conv_bn(c, 12), nn.Conv2d(12, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(conv_bn(c, 6), nn.Conv2d(6, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = torch.relu(self.b(x) + x)
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Concatenation and DenseNet-style BatchNorms that read the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.left = nn.Conv2d(6, 5, 3, padding=1)
        self.right = conv_bn(6, 7, 1)
        self.norm = nn.BatchNorm2d(6 + 5 + 7)
        self.mix = nn.Conv2d(18, 9, 1)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.left(x), self.right(x)], dim=1)
        x = self.mix(F.relu(self.norm(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: chunk, a branch, cat, channel shuffle via view/transpose/reshape."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.branch = nn.Sequential(conv_bn(c // 2, c // 2, 1), nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2),
                                    nn.BatchNorm2d(c // 2), conv_bn(c // 2, c // 2, 1))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FlattenLinear(nn.Module):
    """flatten -> linear: one channel owns h*w consecutive input features of the linear layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 6), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


class Grouped(nn.Module):
    """Grouped conv (groups=4), depthwise conv, and depthwise with channel multiplier 2."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.grouped = conv_bn(16, 8, groups=4)
        self.dw = conv_bn(8, 8, groups=8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.act = nn.Hardswish()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.act(self.dw2(self.dw(self.grouped(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(mean(x))): the scale's neurons are tied to x's channels."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.proj = nn.Conv2d(c, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.proj(x * s)
        return self.head(x.mean((2, 3)))


class ChannelsLast(nn.Module):
    """permute to channels-last, Linear over channels, GELU, a layer-scale parameter, permute back."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.pw1 = nn.Linear(c, 20)
        self.pw2 = nn.Linear(20, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(F.gelu(self.pw1(x.permute(0, 2, 3, 1))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        x = x + y
        return self.head(x.amax(dim=(2, 3)))


class Functional(nn.Module):
    """A conv written with F.conv2d on raw parameters, max/avg pooling, dropout."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(10, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(10) * 0.1)
        self.w2 = nn.Parameter(torch.randn(7, 10, 1, 1) * 0.3)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)), 2)
        x = F.dropout(F.conv2d(x, self.w2), 0.1, self.training)
        return self.head(F.avg_pool2d(x, 8).flatten(1))


class NeedsDim(nn.Module):
    """Python control flow on the input: torch.fx.symbolic_trace fails, torch.export succeeds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.fc(self.body(x).mean((2, 3)))


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 12)
        self.fc3 = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.norm(self.fc1(x)))))


class SigmoidBetween(nn.Module):
    """conv -> sigmoid -> conv: sigmoid(0) = 0.5, so conv1's channels are not exactly removable."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(torch.sigmoid(self.conv1(x))).mean((2, 3))


class FixedView(nn.Module):
    """A reshape whose size is written in the code: the channels before it cannot shrink."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(x.view(x.size(0), 96))


def _doubled(x, factors):
    factors[0] = factors[0] * 2  # mutates its list argument: fine eagerly, not on an fx graph
    return x * factors[0]


torch.fx.wrap("_doubled")


class GraphWontRun(nn.Module):
    """Symbolic tracing succeeds but its graph cannot run (torchvision's swin3d has such a
    function); the capture falls back to torch.export."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(_doubled(self.body(x), [1.0]).mean((2, 3)))


def kill(model, fraction=0.4, seed=0):
    """Zero the gates of a seeded random fraction of every gate's groups (each gate keeps its first)."""
    import dgating_surgery as dg

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in dg.gates(model):
            dead = torch.rand(g.num_groups, generator=gen) < fraction
            dead[0] = False
            g.factors[:, dead] = 0.0
    return model
