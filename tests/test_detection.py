"""An exported torchvision backbone drops into detection fine-tuning with a strict load."""
import torch
from safetensors.torch import load_file
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import collabsurgery as cs


def test_export_loads_strictly_into_faster_rcnn_backbone(tmp_path):
    net = cs.wrap("torchvision.resnet18", split="layer2", heads=2, num_classes=10,
                  input_size=(3, 64, 64))
    path = cs.export(net, head=1, path=tmp_path / "r18.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("fc.")}

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    backbone.body.load_state_dict(state, strict=True)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, net.head_state_dict(1)["layer4.1.conv2.weight"])

    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
    with torch.no_grad():
        detections = detector([torch.rand(3, 64, 64)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
