"""Tiny models for conversion tests: Hugging Face configs with random weights, and hand-written
modules. Nothing is downloaded."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf

TINY = dict(num_hidden_layers=2, num_attention_heads=2)


def hf_configs():
    """name -> (config, model class, expected number of FFNs)."""
    return {
        "bert": (tf.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=64, **TINY),
                 tf.BertModel, 2),
        "roberta": (tf.RobertaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                     **TINY), tf.RobertaModel, 2),
        "gpt2": (tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64),
                 tf.GPT2Model, 2),
        "llama": (tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, **TINY), tf.LlamaModel, 2),
        "mistral": (tf.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                     num_key_value_heads=2, **TINY), tf.MistralModel, 2),
        "qwen2": (tf.Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, **TINY), tf.Qwen2Model, 2),
        "gemma": (tf.GemmaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, head_dim=16, **TINY), tf.GemmaModel, 2),
        "phi3": (tf.Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=64,
                               num_key_value_heads=2, pad_token_id=0, **TINY), tf.Phi3Model, 2),
        "opt": (tf.OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=64), tf.OPTModel, 2),
        "gpt_neox": (tf.GPTNeoXConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                      **TINY), tf.GPTNeoXModel, 2),
        "t5_encoder": (tf.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                   num_heads=2), tf.T5EncoderModel, 2),
        "vit": (tf.ViTConfig(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8,
                             **TINY), tf.ViTModel, 2),
    }


class NanoMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    """nanoGPT-style block: pre-norm attention (simplified) + MLP."""

    def __init__(self, d=32):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.mlp = NanoMLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, d=32, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList(NanoBlock(d) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class RawFFN(nn.Module):
    """An FFN written with F.linear on raw parameters, inside a block with a residual."""

    def __init__(self, d=32, f=96):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(f, d) * d**-0.5)
        self.b1 = nn.Parameter(torch.zeros(f))
        self.w2 = nn.Parameter(torch.randn(d, f) * f**-0.5)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


class RawModel(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn1, self.ffn2 = RawFFN(d), RawFFN(d)

    def forward(self, x):
        x = x + self.ffn1(self.norm(x))
        return x + self.ffn2(x)


def sequential():
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32), nn.LayerNorm(32),
                         nn.Linear(32, 64), nn.SiLU(), nn.Dropout(0.0), nn.Linear(64, 32))


def custom_models():
    """name -> (model, example inputs, expected FFNs)."""
    x = torch.randn(2, 5, 32)
    return {
        "sequential": (sequential(), (x,), 2),
        "nanogpt": (NanoGPT(), (x,), 3),
        "raw_f_linear": (RawModel(), (x,), 2),
        "transformer_encoder": (transformer_encoder(), (x,), 2),
        "sliced_glu": (SlicedGLU(), (x,), 1),
    }


def transformer_encoder():
    """FFN inline in nn.TransformerEncoderLayer.forward: F.relu between two linears."""
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


class SlicedGLU(nn.Module):
    """Fused gate/up projection split by slicing, up half first."""

    def __init__(self, d=32, f=48):
        super().__init__()
        self.f = f
        self.wi = nn.Linear(d, 2 * f, bias=False)
        self.wo = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.wi(x)
        return x + self.wo(h[..., : self.f] * F.gelu(h[..., self.f:]))


# Encoder-decoder and decoder configs need token ids inside the tiny vocabulary.
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, max_position_embeddings=64,
                decoder_start_token_id=2, **_IDS)
_ENCODER = dict(vocab_size=99, hidden_size=32, intermediate_size=64, **TINY)
_DECODER = dict(_ENCODER, num_key_value_heads=2, **_IDS)
_VISION = dict(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8, **TINY)


def architecture_configs():
    """name -> (config, model class, expected number of converted FFNs): architectures
    beyond ``hf_configs``, each a random tiny model. Nothing is downloaded."""
    return {
        # encoders
        "albert": (tf.AlbertConfig(embedding_size=16, **_ENCODER), tf.AlbertModel, 1),
        "electra": (tf.ElectraConfig(embedding_size=16, **_ENCODER), tf.ElectraModel, 2),
        "distilbert": (tf.DistilBertConfig(vocab_size=99, dim=32, hidden_dim=64, n_layers=2,
                                           n_heads=2), tf.DistilBertModel, 2),
        "xlm_roberta": (tf.XLMRobertaConfig(**_ENCODER), tf.XLMRobertaModel, 2),
        "camembert": (tf.CamembertConfig(**_ENCODER), tf.CamembertModel, 2),
        "mpnet": (tf.MPNetConfig(**_ENCODER), tf.MPNetModel, 2),
        "deberta": (tf.DebertaConfig(**_ENCODER), tf.DebertaModel, 2),
        # its classifier head (pooler Linear → GELU → classifier Linear to 2 labels) is
        # skipped with its reason while the encoder FFNs convert
        "deberta_v2_classifier": (tf.DebertaV2Config(**_ENCODER),
                                  tf.DebertaV2ForSequenceClassification, 2),
        "ernie": (tf.ErnieConfig(**_ENCODER), tf.ErnieModel, 2),
        "data2vec_text": (tf.Data2VecTextConfig(**_ENCODER), tf.Data2VecTextModel, 2),
        "modernbert": (tf.ModernBertConfig(**_ENCODER, global_attn_every_n_layers=1,
                                           **_IDS, sep_token_id=3, cls_token_id=4),
                       tf.ModernBertModel, 2),
        "esm": (tf.EsmConfig(**_ENCODER, pad_token_id=1, mask_token_id=2,
                             position_embedding_type="absolute"), tf.EsmModel, 2),
        # decoders
        "falcon": (tf.FalconConfig(vocab_size=99, hidden_size=32, ffn_hidden_size=64, **TINY,
                                   **_IDS), tf.FalconModel, 2),
        "bloom": (tf.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=2, **_IDS),
                  tf.BloomModel, 2),
        "gptj": (tf.GPTJConfig(vocab_size=99, n_embd=32, n_inner=64, n_layer=2, n_head=2,
                               rotary_dim=8, n_positions=64, **_IDS), tf.GPTJModel, 2),
        "gpt_neo": (tf.GPTNeoConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                                    max_position_embeddings=64, **_IDS), tf.GPTNeoModel, 2),
        "codegen": (tf.CodeGenConfig(vocab_size=99, n_embd=32, n_inner=64, n_layer=2, n_head=2,
                                     rotary_dim=8, n_positions=64, n_ctx=64, **_IDS),
                    tf.CodeGenModel, 2),
        "mpt": (tf.MptConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=2, expansion_ratio=2,
                             max_seq_len=64, **_IDS), tf.MptModel, 2),
        "persimmon": (tf.PersimmonConfig(**_ENCODER, **_IDS), tf.PersimmonModel, 2),
        "stablelm": (tf.StableLmConfig(**_DECODER), tf.StableLmModel, 2),
        "starcoder2": (tf.Starcoder2Config(**_DECODER), tf.Starcoder2Model, 2),
        "olmo": (tf.OlmoConfig(**_DECODER), tf.OlmoModel, 2),
        "olmo2": (tf.Olmo2Config(**_DECODER), tf.Olmo2Model, 2),
        "granite": (tf.GraniteConfig(**_DECODER), tf.GraniteModel, 2),
        "phi": (tf.PhiConfig(**_ENCODER, **_IDS), tf.PhiModel, 2),
        "gpt_bigcode": (tf.GPTBigCodeConfig(vocab_size=99, n_embd=32, n_inner=64, n_layer=2,
                                            n_head=2, n_positions=64, **_IDS),
                        tf.GPTBigCodeModel, 2),
        "gemma2": (tf.Gemma2Config(**_DECODER, head_dim=16), tf.Gemma2Model, 2),
        "qwen3": (tf.Qwen3Config(**_DECODER, head_dim=16), tf.Qwen3Model, 2),
        "cohere": (tf.CohereConfig(**_DECODER), tf.CohereModel, 2),
        "glm": (tf.GlmConfig(**_DECODER, head_dim=16), tf.GlmModel, 2),
        "helium": (tf.HeliumConfig(**_DECODER, head_dim=16), tf.HeliumModel, 2),
        "nemotron": (tf.NemotronConfig(**_DECODER, head_dim=16), tf.NemotronModel, 2),
        # encoder-decoders
        "bart": (tf.BartConfig(**_SEQ2SEQ, forced_eos_token_id=2), tf.BartModel, 4),
        "mbart": (tf.MBartConfig(**_SEQ2SEQ), tf.MBartModel, 4),
        "pegasus": (tf.PegasusConfig(**_SEQ2SEQ), tf.PegasusModel, 4),
        "marian": (tf.MarianConfig(**_SEQ2SEQ, decoder_vocab_size=99), tf.MarianModel, 4),
        "blenderbot": (tf.BlenderbotConfig(**_SEQ2SEQ), tf.BlenderbotModel, 4),
        "m2m100": (tf.M2M100Config(**_SEQ2SEQ), tf.M2M100Model, 4),
        "t5": (tf.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                           num_heads=2, **_IDS, decoder_start_token_id=0),
               tf.T5ForConditionalGeneration, 4),
        "whisper": (tf.WhisperConfig(**dict(_SEQ2SEQ, max_position_embeddings=None),
                                     num_mel_bins=8, max_source_positions=16,
                                     max_target_positions=32, suppress_tokens=None,
                                     begin_suppress_tokens=None),
                    tf.WhisperForConditionalGeneration, 4),
        # vision and audio
        "deit": (tf.DeiTConfig(**_VISION), tf.DeiTModel, 2),
        "beit": (tf.BeitConfig(**_VISION, vocab_size=99), tf.BeitModel, 2),
        "dinov2": (tf.Dinov2Config(hidden_size=32, mlp_ratio=2, image_size=32, patch_size=8,
                                   **TINY), tf.Dinov2Model, 2),
        "clip_vision": (tf.CLIPVisionConfig(**_VISION), tf.CLIPVisionModel, 2),
        # two layers' FFNs and its pooling head's MLP
        "siglip_vision": (tf.SiglipVisionConfig(**_VISION), tf.SiglipVisionModel, 3),
        "swin": (tf.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                               image_size=32, patch_size=4, mlp_ratio=2.0), tf.SwinModel, 2),
        "convnext": (tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                       image_size=32),
                     tf.ConvNextModel, 2),
        # MetaFormer: its FFN is two 1x1 convolutions on (B, C, H, W)
        "poolformer": (tf.PoolFormerConfig(num_encoder_blocks=2, depths=[1, 1],
                                           hidden_sizes=[16, 32], patch_sizes=[4, 2],
                                           strides=[4, 2], padding=[1, 0], mlp_ratio=2.0,
                                           image_size=32), tf.PoolFormerModel, 2),
        # LeViT: Linear + BatchNorm1d projections, folded (eval mode); its stages' and
        # subsampling block's MLPs
        "levit": (tf.LevitConfig(image_size=32, patch_size=16, hidden_sizes=[16, 24],
                                 num_attention_heads=[1, 2], depths=[1, 1], key_dim=[8, 8],
                                 mlp_ratio=[2, 2], attention_ratio=[2, 2],
                                 down_ops=[["Subsample", 8, 2, 4, 2, 2]]), tf.LevitModel, 3),
        # Swin V2: its position-bias MLPs read a fixed coordinate table: not token FFNs
        "swinv2": (tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                   num_heads=[1, 2], window_size=4, mlp_ratio=2.0),
                   tf.Swinv2Model, 2),
        "hubert": (tf.HubertConfig(**_ENCODER, conv_dim=(16, 16), conv_kernel=(4, 2),
                                   conv_stride=(4, 2), num_conv_pos_embeddings=8,
                                   num_conv_pos_embedding_groups=2), tf.HubertModel, 2),
        "wav2vec2": (tf.Wav2Vec2Config(**_ENCODER,
                                       conv_dim=(16, 16), conv_kernel=(4, 2), conv_stride=(4, 2),
                                       num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2),
                     tf.Wav2Vec2Model, 2),
    }


class PreNormResidual(nn.Module):
    """x + ffn(LayerNorm(x)): a transformer block's FFN half, around any FFN or MoE layer."""

    def __init__(self, ffn: nn.Module, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


# ----------------------------------------------------- blocks that are (or are not) token FFNs


class LinearBN(nn.Module):
    """LeViT's MLPLayerWithBN: a bias-free Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.batch_norm = nn.BatchNorm1d(d_out)

    def forward(self, x):
        h = self.linear(x)
        return self.batch_norm(h.flatten(0, 1)).reshape_as(h)


def randomize_batch_norms(model):
    """Running statistics and affine parameters away from their identity initialisation."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


class LevitMLP(nn.Module):
    """x + LinearBN → Hardswish → LinearBN (LeViT's residual MLP)."""

    def __init__(self, d=16, f=32):
        super().__init__()
        self.linear_up, self.act, self.linear_down = LinearBN(d, f), nn.Hardswish(), LinearBN(f, d)

    def forward(self, x):
        return x + self.linear_down(self.act(self.linear_up(x)))


class ChannelAffineMLP(nn.Module):
    """Per-feature affine maps after the first projection: a parameter scale, a buffer shift
    and a constant divisor; a LayerScale parameter after the second."""

    def __init__(self, d=16, f=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.scale = nn.Parameter(torch.randn(f))
        self.register_buffer("shift", torch.randn(f))
        self.divisor = torch.linspace(1.0, 2.0, f)  # a plain tensor: a lifted constant
        self.layer_scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = (self.fc1(x) * self.scale + self.shift) / self.divisor - torch.tensor(0.5)
        return x + self.fc2(F.gelu(h)) * self.layer_scale


class ConvBNMlp(nn.Module):
    """Channels-first: 1×1 convolution + BatchNorm2d → ReLU → 1×1 convolution + BatchNorm2d."""

    def __init__(self, d=16, f=32):
        super().__init__()
        self.fc1, self.bn1 = nn.Conv2d(d, f, 1, bias=False), nn.BatchNorm2d(f)
        self.fc2, self.bn2 = nn.Conv2d(f, d, 1, bias=False), nn.BatchNorm2d(d)

    def forward(self, x):
        return x + self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class PositionBiasBlock(nn.Module):
    """A token FFN, and Swin V2's continuous position-bias MLP: Linear(2, h) → ReLU →
    Linear(h, 2) over a fixed coordinate table (a buffer), added to the tokens' features."""

    def __init__(self, d=16, window=3):
        super().__init__()
        coords = torch.stack(torch.meshgrid(torch.arange(-window + 1, window).float(),
                                            torch.arange(-window + 1, window).float(),
                                            indexing="ij"), dim=-1)  # (2w-1, 2w-1, 2)
        self.register_buffer("coords_table", coords / window)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        bias = self.cpb_mlp(self.coords_table).mean()  # one number per call
        return x + self.ffn(x) + bias


class SqueezeExcite(nn.Module):
    """EfficientNet / MaxViT gate on a (B, C, H, W) map: spatial mean → 1×1 conv → SiLU →
    1×1 conv → sigmoid → times the map. ``linear``: the (B, T, C) form with Linears."""

    def __init__(self, c=16, reduced=4, linear=False):
        super().__init__()
        self.linear = linear
        layer = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.reduce, self.expand = layer(c, reduced), layer(reduced, c)

    def forward(self, x):
        pooled = x.mean(1, keepdim=True) if self.linear else x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(pooled))))


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: Linear → depthwise 3×3 conv over the (rows, ``width``) layout →
    GELU → Linear, on tokens (B, rows · width, C)."""

    def __init__(self, d=16, f=32, width=5):
        super().__init__()
        self.width = width
        self.dense1, self.dense2 = nn.Linear(d, f), nn.Linear(f, d)
        self.dwconv = nn.Conv2d(f, f, 3, padding=1, groups=f)

    def forward(self, x):
        h = self.dense1(x).transpose(1, 2).unflatten(2, (-1, self.width))  # (B, C, rows, w)
        h = self.dwconv(h).flatten(2).transpose(1, 2)
        return x + self.dense2(F.gelu(h))


class SubLNSwiGLU(nn.Module):
    """EVA-02's SwiGLU with a sub-LN: down(norm(silu(gate(x)) * up(x))); ``gated=False``:
    down(norm(gelu(up(x)))). ``norm``: "layer_norm" or "rms_norm"."""

    def __init__(self, d=16, f=32, gated=True, norm="layer_norm"):
        super().__init__()
        self.gated = gated
        self.gate = nn.Linear(d, f) if gated else None
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)
        self.norm = nn.LayerNorm(f) if norm == "layer_norm" else nn.RMSNorm(f)
        with torch.no_grad():  # away from the identity, so that folding them is tested
            self.norm.weight.normal_()
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_()

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))
        return x + self.down(self.norm(h))


def new_architecture_configs():
    """name -> (config, model class): Hugging Face architectures whose blocks need the
    matcher's newer rules (folded BatchNorms, rejected non-token blocks). Nothing is
    downloaded."""
    return {
        "segformer": (tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                         hidden_sizes=[16, 32], patch_sizes=[7, 3],
                                         strides=[4, 2], num_attention_heads=[1, 2],
                                         mlp_ratios=[2, 2], image_size=32), tf.SegformerModel),
        "efficientnet": (tf.EfficientNetConfig(image_size=32, width_coefficient=0.25,
                                               depth_coefficient=0.25, hidden_dim=320),
                         tf.EfficientNetModel),
    }
